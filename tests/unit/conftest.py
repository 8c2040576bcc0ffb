"""Fixtures for unit tests of the broker's table."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared.wire import Policy
from tests.unit.test_table import Harness


@pytest.fixture
def harness() -> Iterator[Callable[..., Harness]]:
    """Make HUP-policy table harnesses (keyword arguments go to :class:`Harness`); every
    fd they hold is closed after the test."""
    made: list[Harness] = []

    def factory(**kw: Any) -> Harness:
        h = Harness(Policy.HUP, **kw)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()
