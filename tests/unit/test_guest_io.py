"""The guest's ioeventfd table and the access rule both sides share: a write's value is
taken at the access width before it is compared with a datamatch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from guestemu.irq import IoEventFd, IoEventTable
from shared import wire
from shared.fds import EventNotifier, eventfd_info, new_eventfd


@pytest.fixture
def table() -> Iterator[IoEventTable]:
    t = IoEventTable()
    yield t
    t.close()


def add(
    t: IoEventTable, binding: int, *, pio: bool, addr: int, length: int, datamatch: int | None
) -> EventNotifier:
    notifier = EventNotifier(new_eventfd())
    t.add(IoEventFd(binding, pio, addr, length, datamatch, notifier))
    return notifier


def count(n: EventNotifier) -> int:
    info = eventfd_info(n.fd.fd)
    assert info is not None
    return info.count


def test_write_value_is_taken_at_the_access_width(table: IoEventTable) -> None:
    wide = add(table, 1, pio=False, addr=0x100, length=1, datamatch=0x1FF)
    narrow = add(table, 2, pio=False, addr=0x200, length=1, datamatch=0xFF)
    # A 1-byte write carries one byte: 0x1FF arrives as 0xFF and never matches 0x1FF.
    assert not table.write(False, 0x100, 1, 0x1FF)
    assert count(wide) == 0
    assert table.write(False, 0x200, 1, 0x1FF)
    assert count(narrow) == 1


def test_length_zero_pio_ioeventfd_matches_any_width(table: IoEventTable) -> None:
    any_width = add(table, 1, pio=True, addr=0x60, length=0, datamatch=None)
    for width in (1, 2, 4, 8):
        assert table.write(True, 0x60, width, 7)
    assert not table.write(False, 0x60, 4, 7)  # the other bus
    assert count(any_width) == 4


@pytest.mark.parametrize(
    "length,addr,value,word",
    [
        (3, 0, 0, "1, 2, 4 or 8"),
        (4, (1 << 64) - 2, 0, "past the end"),
        (1, 0, 0x1FF, "does not fit a 1-byte"),
        (2, 0, 1 << 16, "does not fit a 2-byte"),
    ],
)
def test_access_error_names_the_rule(length: int, addr: int, value: int, word: str) -> None:
    why = wire.access_error(length, addr, value)
    assert why is not None and word in why


def test_access_error_accepts_every_cpu_access() -> None:
    for width in (1, 2, 4, 8):
        assert wire.access_error(width, (1 << 64) - width, (1 << (8 * width)) - 1) is None


def test_a_cached_hit_follows_changes_to_the_table(table: IoEventTable) -> None:
    first = add(table, 1, pio=False, addr=0x300, length=2, datamatch=None)
    assert table.write(False, 0x300, 2, 5) and table.write(False, 0x300, 2, 5)  # cached
    assert count(first) == 2
    assert table.remove(1)
    assert not table.write(False, 0x300, 2, 5)  # removed: an exit, not the stale eventfd
    second = add(table, 2, pio=False, addr=0x300, length=2, datamatch=5)
    assert table.write(False, 0x300, 2, 5)
    assert count(second) == 1
    # a second match added later: the walk (and so the cache) still picks the first
    wild = add(table, 0, pio=False, addr=0x300, length=0, datamatch=None)
    assert table.write(False, 0x300, 2, 5)
    assert (count(second), count(wild)) == (2, 0)
    assert table.remove(2)
    assert table.write(False, 0x300, 2, 5)  # now the wildcard
    assert (count(wild), table.hits, table.misses) == (1, 5, 1)
