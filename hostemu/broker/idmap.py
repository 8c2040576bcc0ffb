"""A dict keyed by ints that can also list its keys in order from a cursor, in
O(log n + page): what lets introspection page through the broker's tables.

Invariant: ``_keys`` is exactly ``sorted(self)``. The broker's ids are allocated in
increasing order, so an insert is an append; deletes are a bisect and a memmove. Only
the dict methods the broker uses are kept in step (item assignment, ``del``, ``pop``,
``clear``); the others are refused rather than silently skipping the index.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from typing import Any, Generic, NoReturn, TypeVar

V = TypeVar("V")
_MISSING: Any = object()


class IdMap(dict[int, V], Generic[V]):
    def __init__(self) -> None:
        super().__init__()
        self._keys: list[int] = []

    def __setitem__(self, key: int, value: V) -> None:
        if key not in self:
            if not self._keys or key > self._keys[-1]:
                self._keys.append(key)
            else:  # not the newest id (a wrapped handle number): keep the order anyway
                insort(self._keys, key)
        super().__setitem__(key, value)

    def __delitem__(self, key: int) -> None:
        super().__delitem__(key)
        del self._keys[bisect_left(self._keys, key)]

    def pop(self, key: int, default: Any = _MISSING) -> Any:
        if key in self:
            value = super().pop(key)
            del self._keys[bisect_left(self._keys, key)]
            return value
        if default is _MISSING:
            raise KeyError(key)
        return default

    def clear(self) -> None:
        super().clear()
        self._keys.clear()

    def keys_after(self, after: int) -> Iterator[int]:
        """Keys greater than ``after``, ascending. The map must not change while the
        iterator is consumed (a page is built in one go)."""
        keys = self._keys
        i = bisect_right(keys, after)
        while i < len(keys):
            yield keys[i]
            i += 1

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("IdMap keeps its key order only through [] =, del, pop and clear")

    setdefault = update = popitem = _refuse
