"""Every wall-clock bound in the tests comes from here, scaled by one factor.

Tests synchronize on events wherever they can. Where one must give up after a while (a
reply that never comes, a process that never exits), the bound is a *liveness* bound,
never a speed claim, and it is ``seconds * TIME_SCALE``. ``VBUSEMU_TEST_TIME_SCALE`` sets
the factor; the default is generous enough for a 2-core machine that other work keeps
busy. A quiet machine can lower it (``1`` gives the bare numbers written in the tests) to
find a hang sooner; a slower or busier one raises it. The pytest-timeout limits are
scaled by the same factor (``tests/conftest.py``).

A test states liveness as "the awaited event happened before the deadline": wait with a
bound from :func:`scaled` or :func:`remaining`, or wrap the step in :func:`within`. It
never asserts on a measured duration (``tests/test_quality.py`` checks that).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

ENV: Final = "VBUSEMU_TEST_TIME_SCALE"
DEFAULT_SCALE: Final = 5.0


def _scale_from_env() -> float:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_SCALE
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{ENV}={raw!r} must be a finite number above 0")
    return value


TIME_SCALE: Final = _scale_from_env()
"""The factor every wall-clock bound in the tests is multiplied by."""


def scaled(seconds: float) -> float:
    """``seconds`` of patience on a quiet machine, as patience on this one."""
    return seconds * TIME_SCALE


def deadline(seconds: float) -> float:
    """The :func:`time.monotonic` instant :func:`scaled` ``(seconds)`` from now."""
    return time.monotonic() + scaled(seconds)


def remaining(until: float) -> float:
    """Seconds left until the :func:`deadline` ``until`` (0 once it passed)."""
    return max(0.0, until - time.monotonic())


def expired(until: float) -> bool:
    """Whether the :func:`deadline` ``until`` has passed."""
    return time.monotonic() >= until


@contextmanager
def within(seconds: float, what: str) -> Iterator[None]:
    """Fail if the body (``what`` happening) ends after the scaled deadline.

    For steps that cannot be given a bound themselves (a loop that must terminate, a
    call without a timeout): a liveness check, generous by construction.
    """
    until = deadline(seconds)
    yield
    if expired(until):
        raise AssertionError(
            f"{what} did not happen within {scaled(seconds):g} s "
            f"({seconds:g} s x {ENV}={TIME_SCALE:g})"
        )
