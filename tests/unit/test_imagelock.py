"""Disk image locks (``hostemu.imagelock``): OFD locks, all-or-nothing, clear refusals."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from hostemu import topology as topo
from hostemu.imagelock import ImageInUseError, lock_image, lock_images, ofd_lock
from shared.errors import ConfigError


def test_two_ofd_locks_on_one_file_conflict_within_one_process(tmp_path: Path) -> None:
    """The point of OFD locks over POSIX ones: the lock belongs to the open file, so a
    second open in the *same* process is refused, and closing it does not drop the
    first one's lock."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"")
    first = os.open(path, os.O_RDWR)
    second = os.open(path, os.O_RDWR)
    third = os.open(path, os.O_RDONLY)
    try:
        ofd_lock(first)
        with pytest.raises(OSError) as info:
            ofd_lock(second)
        assert info.value.errno in (errno.EAGAIN, errno.EACCES)
        os.close(third)  # a POSIX lock would be gone now; an OFD lock is not
        third = -1
        with pytest.raises(OSError):
            ofd_lock(second)
        os.close(first)
        first = -1
        ofd_lock(second)  # the holder's open file is gone: free
    finally:
        for fd in (first, second, third):
            if fd >= 0:
                os.close(fd)


def test_second_lock_of_an_image_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with lock_images([path]) as locks:
        assert list(locks.held) == [path]
        with pytest.raises(ImageInUseError) as info:
            lock_image(path)
        assert str(path) in str(info.value)
        assert "in use by another vbusemu run" in str(info.value)
        assert isinstance(info.value, ConfigError)  # `vbusemu run` exits 2 on it
    fd = lock_image(path)  # released with the `with`
    assert fd is not None
    fd.close()


def test_missing_image_is_created_empty_and_private(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    fd = lock_image(path)
    assert fd is not None
    try:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0
        assert st.st_size == 0  # the blk device sizes it
        assert not os.get_inheritable(fd.fd)
    finally:
        fd.close()


def test_lock_images_takes_all_or_none(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    other = lock_image(b)
    assert other is not None
    try:
        with pytest.raises(ImageInUseError) as info:
            lock_images([a, b])
        assert info.value.path == b
        fd = lock_image(a)  # not left locked by the failed attempt
        assert fd is not None
        fd.close()
    finally:
        other.close()


def test_one_image_named_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with pytest.raises(ConfigError, match="used by two devices"):
        lock_images([path, tmp_path / "." / "disk.img"])
    fd = lock_image(path)
    assert fd is not None
    fd.close()


def test_a_non_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        lock_image(fifo)


def test_image_paths_are_the_blk_images_resolved_against_the_topology(tmp_path: Path) -> None:
    text = """
[[vm]]
name = "a"
workload = { name = "main" }
[[vm.device]]
name = "disk0"
model = "blk"
params = { image = "disk-a.img", capacity = 8 }
[[vm.device]]
name = "console0"
model = "console"

[[vm]]
name = "b"
workload = { name = "main" }
[[vm.device]]
name = "disk0"
model = "blk"
params = { image = "/elsewhere/disk-b.img", capacity = 8 }
"""
    t = topo.loads(text, tmp_path)
    assert topo.image_paths(t) == [tmp_path / "disk-a.img", Path("/elsewhere/disk-b.img")]
