"""The JIT switch and the numba cache-directory fallback (shared.jit)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared import jit
from shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    full = dict(os.environ)
    full.update(env or {})
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_importing_shared_jit_does_not_import_numba() -> None:
    out = _python(
        "import sys, json, shared.jit as j; "
        "print(json.dumps([j.jit_enabled(), sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('numba', 'llvmlite'))]))",
        env={"VBUSEMU_JIT": "1"},
    )
    enabled, heavy = json.loads(out)
    assert enabled is True
    assert heavy == []


@pytest.mark.parametrize(
    ("value", "expected"), [(None, True), ("", True), ("1", True), ("0", False), (" 0 ", False)]
)
def test_jit_enabled_values(value: str | None, expected: bool) -> None:
    env = {} if value is None else {"VBUSEMU_JIT": value}
    assert jit.jit_enabled(env) is expected


@pytest.mark.parametrize("value", ["yes", "2", "off", "true"])
def test_jit_enabled_rejects_other_values_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match=r"VBUSEMU_JIT='.*': expected 0 .* or 1"):
        jit.jit_enabled({"VBUSEMU_JIT": value})


def _choose(env: dict[str, str], writable: bool, private: set[Path] | None = None) -> Path | None:
    accepted = private if private is not None else set(jit.cache_dir_candidates(env, 1000, "/t"))
    return jit.choose_cache_dir(
        [Path("/srv/vbusemu/shared"), Path("/srv/vbusemu/guestemu")],
        env,
        uid=1000,
        tmpdir="/t",
        writable=lambda _p: writable,
        private=lambda p, _uid: p in accepted,
    )


def test_writable_source_tree_leaves_numba_alone() -> None:
    assert _choose({"HOME": "/home/u"}, writable=True) is None


def test_user_choice_of_numba_cache_dir_wins() -> None:
    assert _choose({"NUMBA_CACHE_DIR": "/mine", "HOME": "/home/u"}, writable=False) is None


def test_read_only_tree_falls_back_to_xdg_then_home_then_tmp() -> None:
    env = {"XDG_CACHE_HOME": "/x/cache", "HOME": "/home/u"}
    assert _choose(env, writable=False) == Path("/x/cache/vbusemu/numba")
    home = Path("/home/u/.cache/vbusemu/numba")
    assert _choose(env, writable=False, private={home}) == home
    assert _choose({"HOME": "/home/u"}, writable=False) == home
    tmp = Path("/t/vbusemu-1000/numba")
    assert _choose({"XDG_CACHE_HOME": "relative", "HOME": ""}, writable=False) == tmp


def test_no_private_directory_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="NUMBA_CACHE_DIR"):
        _choose({"HOME": "/home/u"}, writable=False, private=set())


def test_probe_and_privacy_on_real_directories(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert not jit._probe_writable(a_file / "__pycache__")  # cannot exist under a file
    assert jit._probe_writable(tmp_path / "pkg" / "__pycache__")

    uid = os.getuid()
    ours = tmp_path / "ours" / "numba"
    assert jit._private_dir(ours, uid)
    assert stat.S_IMODE(ours.stat().st_mode) == 0o700
    shared_dir = tmp_path / "group-writable"
    shared_dir.mkdir()
    shared_dir.chmod(0o775)
    assert not jit._private_dir(shared_dir, uid)
    assert not jit._private_dir(ours, uid + 1)  # owned by someone else
    assert not jit._private_dir(a_file, uid)


def test_prepare_sets_numba_cache_dir_for_a_read_only_tree(tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("")
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    chosen = jit.prepare_numba_cache(env, [a_file])
    assert chosen == tmp_path / "xdg" / "vbusemu" / "numba"
    assert env["NUMBA_CACHE_DIR"] == str(chosen)
    assert chosen.is_dir()
    assert jit.prepare_numba_cache(env, [a_file]) is None  # now set: left alone


KERNEL_MODULE = """
import numpy as np
from numba import njit
from shared.virtio.atomics import fence_seq_cst, load_acquire_u16, store_release_u16

@njit(cache=True, nogil=True)
def publish(mine, theirs, value):
    store_release_u16(mine, 0, value)
    fence_seq_cst()
    return load_acquire_u16(theirs, 0)
"""

DRIVER = """
import json, sys, time
import numpy as np
sys.path.insert(0, {where!r})
t0 = time.perf_counter()
import kernels_under_test as k
a, b = np.zeros(2, np.uint16), np.full(2, 9, np.uint16)
t1 = time.perf_counter()
r = k.publish(a, b, 3)
t2 = time.perf_counter()
print(json.dumps({{"r": int(r), "hits": sum(k.publish.stats.cache_hits.values()),
                  "misses": sum(k.publish.stats.cache_misses.values()), "first_call": t2 - t1}}))
"""


@pytest.mark.timeout(300)
def test_cached_kernels_load_from_the_chosen_directory(tmp_path: Path) -> None:
    """A cache=True kernel compiles once, is written under NUMBA_CACHE_DIR, and the next
    process loads it from there instead of compiling."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "kernels_under_test.py").write_text(textwrap.dedent(KERNEL_MODULE))
    cache = tmp_path / "cache"
    code = DRIVER.format(where=str(src))
    env = {"NUMBA_CACHE_DIR": str(cache)}
    cold = json.loads(_python(code, env, timeout=240))
    assert cold["r"] == 9 and cold["misses"] >= 1 and cold["hits"] == 0
    assert list(cache.rglob("*.nbi")) and list(cache.rglob("*.nbc"))
    assert not (src / "__pycache__").exists() or not list((src / "__pycache__").glob("*.nbi"))
    warm = json.loads(_python(code, env, timeout=240))
    assert warm["r"] == 9 and warm["hits"] >= 1 and warm["misses"] == 0


def test_prepare_after_numba_was_imported_reloads_its_config(tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("")
    code = (
        "import json, os, numba.core.config as c\n"
        "from pathlib import Path\n"
        "from shared import jit\n"
        f"chosen = jit.prepare_numba_cache(None, [Path({str(a_file)!r})])\n"
        "print(json.dumps([str(chosen), c.CACHE_DIR, os.environ['NUMBA_CACHE_DIR']]))\n"
    )
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "NUMBA_CACHE_DIR": ""}
    chosen, numba_sees, environ = json.loads(_python(code, env))
    assert chosen == numba_sees == environ == str(tmp_path / "xdg" / "vbusemu" / "numba")
