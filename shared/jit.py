"""Switches and set-up for the compiled (numba) data path -- without importing numba.

Only the processes that run kernels (guests and device processes) import numba; the
broker, the VMM and the launcher stay light (about 25 MiB instead of 140 MiB resident).
So this module imports nothing heavier than the standard library: a process can ask
:func:`jit_enabled` and call :func:`prepare_numba_cache` before it decides to import
numba at all.

* ``VBUSEMU_JIT`` -- ``1`` (the default) runs the numba kernels; ``0`` runs the plain
  numpy reference implementation instead, for the whole run (every process reads the same
  environment). Anything else is a :class:`~shared.errors.ConfigError` naming the
  variable.
* numba's ``cache=True`` stores compiled kernels next to the source, in ``__pycache__``;
  when that directory cannot be written (a read-only install) it tries the user cache,
  and when neither works, *defining* a cached kernel raises ``RuntimeError: no locator
  available``. :func:`prepare_numba_cache` prevents that: if a kernel source directory is
  not writable and ``NUMBA_CACHE_DIR`` is not set, it sets ``NUMBA_CACHE_DIR`` to a
  private writable directory -- ``$XDG_CACHE_HOME/vbusemu/numba``,
  ``~/.cache/vbusemu/numba``, or ``$TMPDIR/vbusemu-$UID/numba``, the first that works. A
  candidate must be a directory owned by this user and not writable by group or others
  (numba's cache files are pickles: whoever can write them can run code in our
  processes).
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path

from shared.errors import ConfigError

JIT_ENV = "VBUSEMU_JIT"
CACHE_ENV = "NUMBA_CACHE_DIR"

KERNEL_PACKAGES: tuple[str, ...] = ("shared", "hostemu", "guestemu")
"""Top-level packages that may hold ``cache=True`` kernels (numba caches each kernel in
the ``__pycache__`` next to its source file)."""


def jit_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True unless ``VBUSEMU_JIT=0``. Unset or empty means on; a value other than 0 or 1
    is a :class:`ConfigError`."""
    env = os.environ if environ is None else environ
    value = env.get(JIT_ENV, "").strip()
    if value in ("", "1"):
        return True
    if value == "0":
        return False
    raise ConfigError(
        f"{JIT_ENV}={value!r}: expected 0 (plain numpy reference path) or 1 (numba kernels, "
        "the default)"
    )


def _probe_writable(directory: Path) -> bool:
    """Whether numba could cache in ``directory``: the same test numba makes (create the
    directory, create a temporary file in it). Unlike ``os.access`` this is right for
    root, for read-only mounts and for ACLs."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError:
        return False
    return True


def _private_dir(directory: Path, uid: int) -> bool:
    """Create ``directory`` (mode 0700 for what we create) and check it is ours alone."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = directory.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == uid
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and _probe_writable(directory)
    )


def cache_dir_candidates(environ: Mapping[str, str], uid: int, tmpdir: str) -> list[Path]:
    """Where to put numba's cache when the source tree is read-only, best first."""
    out: list[Path] = []
    xdg = environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        out.append(Path(xdg) / "vbusemu" / "numba")
    home = environ.get("HOME", "")
    if home and os.path.isabs(home):
        out.append(Path(home) / ".cache" / "vbusemu" / "numba")
    out.append(Path(tmpdir) / f"vbusemu-{uid}" / "numba")
    return out


def choose_cache_dir(
    source_dirs: Iterable[Path],
    environ: Mapping[str, str],
    *,
    uid: int,
    tmpdir: str,
    writable: Callable[[Path], bool] = _probe_writable,
    private: Callable[[Path, int], bool] = _private_dir,
) -> Path | None:
    """The directory ``NUMBA_CACHE_DIR`` should be set to, or None to leave it alone.

    None when ``NUMBA_CACHE_DIR`` is already set (the user's choice wins) or when every
    source directory's ``__pycache__`` is writable (numba's in-tree cache works). Otherwise
    the first candidate of :func:`cache_dir_candidates` that ``private`` accepts; a
    :class:`ConfigError` when none does.
    """
    if environ.get(CACHE_ENV):
        return None
    if all(writable(d / "__pycache__") for d in source_dirs):
        return None
    candidates = cache_dir_candidates(environ, uid, tmpdir)
    for candidate in candidates:
        if private(candidate, uid):
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        f"numba cannot cache compiled kernels: the source tree is read-only and none of "
        f"{tried} is a private writable directory; set {CACHE_ENV} to one (or {JIT_ENV}=0)"
    )


def kernel_source_dirs() -> list[Path]:
    """The installed vbusemu packages (siblings of this one) that exist."""
    root = Path(__file__).resolve().parent.parent
    return [root / name for name in KERNEL_PACKAGES if (root / name).is_dir()]


def prepare_numba_cache(
    environ: MutableMapping[str, str] | None = None,
    source_dirs: Sequence[Path] | None = None,
) -> Path | None:
    """Make sure ``cache=True`` kernels can be defined: set ``NUMBA_CACHE_DIR`` if needed.

    Call it before the first kernel module is imported (ideally before numba is). If numba
    is already imported it is told to re-read its configuration. Returns the directory it
    chose, or None when nothing had to change. Idempotent and cheap (a few ``stat`` calls
    and one temporary file per source directory).
    """
    env = os.environ if environ is None else environ
    dirs = kernel_source_dirs() if source_dirs is None else source_dirs
    chosen = choose_cache_dir(dirs, env, uid=os.getuid(), tmpdir=tempfile.gettempdir())
    if chosen is None:
        return None
    env[CACHE_ENV] = str(chosen)
    if env is os.environ and "numba" in sys.modules:
        from numba.core import config  # already imported: costs nothing

        config.reload_config()  # type: ignore[no-untyped-call]
    return chosen
