"""Disk image locks: one vbusemu run at a time per disk image, the way QEMU locks images.

``vbusemu run`` locks every disk image of its topology before it starts anything and
holds the locks until it has torn everything down, so a second run of the same topology
(or of another one naming the same image) stops at once -- exit 2, naming the image --
instead of two blk devices writing one file.

Invariants
----------
* The lock is an *open file description* lock (``F_OFD_SETLK``, ``F_WRLCK``, the whole
  file): it belongs to one ``open()``, not to the process. Two opens conflict even in
  the same process (a POSIX ``lockf`` lock would not), closing some other descriptor of
  the file does not drop it, and it goes when the last descriptor of that open file is
  closed -- including by the kernel when the holder dies, so a killed run leaves no stale
  lock behind.
* The holder is the launcher, which outlives every process of the run: blk device
  processes that die and are restarted do not touch the lock. The descriptors are
  close-on-exec, so nothing the launcher starts inherits them.
* Whole-file write locks also conflict with the byte-range locks QEMU takes, so an image
  QEMU has open is refused too (and QEMU refuses one vbusemu holds).
* A missing image is created (mode 0600, empty) so it can be locked; the blk device
  sizes it when it opens it. A filesystem that cannot lock at all (``ENOLCK``,
  ``EOPNOTSUPP``) does not stop the run: the image is left unlocked and
  :attr:`ImageLocks.unlocked` says which.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from shared.errors import ConfigError
from shared.fds import OwnedFd

F_OFD_SETLK: Final = getattr(fcntl, "F_OFD_SETLK", 37)
"""``fcntl`` command: set an OFD lock without waiting (Linux >= 3.15; 37 on every arch)."""
_CONFLICT: Final = frozenset({errno.EAGAIN, errno.EACCES})
_UNSUPPORTED: Final = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


class ImageInUseError(ConfigError):
    """An image is locked by another open file: another vbusemu run (or QEMU) uses it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"disk image {path} is in use by another vbusemu run (or another program "
            "holding a lock on it); stop that run first, or give this topology other images"
        )


class _Flock(ctypes.Structure):
    """``struct flock`` (``off_t`` is 64-bit on every Linux Python builds for)."""

    _fields_ = (
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),  # must be 0 for OFD locks
    )


def ofd_lock(fd: int, *, exclusive: bool = True) -> None:
    """Lock the whole file open on ``fd`` (an OFD lock, without waiting).

    Raises ``OSError`` with ``EAGAIN``/``EACCES`` when another open file description holds
    a conflicting lock (in this process or any other)."""
    lock = _Flock(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
    fcntl.fcntl(fd, F_OFD_SETLK, bytes(lock))


@dataclass
class ImageLocks:
    """The locked images of one run; :meth:`release` (or ``with``) drops them all."""

    held: dict[Path, OwnedFd] = field(default_factory=dict)
    unlocked: list[Path] = field(default_factory=list)

    def release(self) -> None:
        for fd in self.held.values():
            fd.close()
        self.held.clear()

    def __enter__(self) -> ImageLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_image(path: Path) -> OwnedFd | None:
    """Open (creating it if missing) and lock ``path``; None if its filesystem cannot lock.

    :class:`ImageInUseError` if it is locked elsewhere; :class:`ConfigError` if it cannot
    be opened or is not a regular file."""
    try:
        fd = OwnedFd(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise ConfigError(f"disk image {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd.fd).st_mode):
            raise ConfigError(f"disk image {path} is not a regular file")
        try:
            ofd_lock(fd.fd)
        except OSError as e:
            if e.errno in _CONFLICT:
                raise ImageInUseError(path) from None
            if e.errno in _UNSUPPORTED:
                fd.close()
                return None
            raise ConfigError(f"disk image {path}: cannot lock it: {e.strerror}") from None
    except BaseException:
        fd.close()
        raise
    return fd


def lock_images(paths: Iterable[Path]) -> ImageLocks:
    """Lock every image in ``paths`` (in order), or none: on the first failure the ones
    already taken are released and the error raised. A path named twice is an error."""
    locks = ImageLocks()
    seen: set[Path] = set()
    try:
        for path in paths:
            if Path(os.path.realpath(path)) in seen:
                raise ConfigError(f"disk image {path} is used by two devices of this topology")
            seen.add(Path(os.path.realpath(path)))
            fd = lock_image(path)
            if fd is None:
                locks.unlocked.append(path)
            else:
                locks.held[path] = fd
    except BaseException:
        locks.release()
        raise
    return locks
