"""vbus shm-signal: interrupt/kick suppression through three flag bytes in shared memory.

The shared structure (vbus ``include/linux/shm_signal.h``)::

    struct shm_signal_desc {            offset
        u32 magic;      0x58fa39df        0
        u32 ver;        1                 4
        struct { u8 enabled, pending, dirty; } irq[2];   8, 11   (padded to 16 bytes)
    };

``irq[NORTH]`` is the state of events flowing *to* the guest (north: the guest side, as in
the vbus guest drivers), ``irq[SOUTH]`` of events flowing to the host. Each side owns the
``enabled`` byte of its own ``irq[local]``; the other side writes ``dirty`` and ``pending`` in
it when injecting, and the owner clears them when handling.

Theory of operation
-------------------
* **inject** (the producer, after putting work into the shared queue): set the remote's
  ``dirty``; if the remote is ``enabled`` and no signal is ``pending``, set ``pending`` and
  return ``True``: the caller must signal the eventfd. Otherwise a signal is already on its
  way, or the remote polls (disabled) and will see ``dirty``.
* **wakeup** (the consumer, on the signal): while ``enabled and (dirty or pending)``: clear
  ``dirty`` and run the handler, again as long as the producer re-dirtied meanwhile; then
  clear ``pending`` -- the producer injects no new signal while ``pending`` is set, so it is
  cleared only after the work is drained, and the outer loop re-checks what raced with it.
* **enable** sets ``enabled`` and then re-checks ``dirty``/``pending``: if either is set, an
  event arrived while disabled (and no signal was sent for it), so :meth:`ShmSignal.enable`
  returns ``True`` and the caller must run the handler now. **disable** clears ``enabled``.

Invariant (no lost event): after a producer's inject completes and the consumer is enabled,
either the producer returned ``True`` (a signal is coming), or ``pending`` was already set
by a signal not yet acknowledged (whose wakeup's re-check will see ``dirty``), or the
consumer's enable returns ``True``, or a running wakeup's re-check sees ``dirty``.

Memory ordering
---------------
Three store->load points (the only reordering x86 does; see :mod:`shared.virtio.ordering`),
each a :func:`~shared.virtio.ordering.full_barrier`: inject stores ``dirty`` then loads
``enabled``/``pending``; enable stores ``enabled`` then loads ``dirty``/``pending``; wakeup
stores ``pending = 0`` then re-loads ``dirty``. Two more fences: after wakeup's ``dirty = 0``
(before the handler loads the queue: a delayed clear could otherwise land after the producer's
next ``dirty = 1`` and erase it while the handler read the old queue), and after inject's
``pending = 1`` (it must be visible before the remote can be woken by our signal, or its wakeup
could clear ``pending`` first and leave it stuck at 1, silencing every later inject). The vbus
original used ``wmb()`` at these points, which orders stores only, not a store before a later
load.

The protocol is written once, as pure step generators (:func:`inject_steps`,
:func:`enable_steps`, :func:`wakeup_steps` ...) that yield the memory operations they need
(:class:`Load`, :class:`Store`, :class:`Fence`, :class:`RunHandler`) and receive loaded
values. :class:`ShmSignal` runs them against a numpy view of shared memory with a real
barrier; tests run the very same generators against an interleaving, store-buffering memory
model to check that no event is lost.

Bytes read from shared memory are untrusted: any non-zero byte counts as 1, nothing else is
derived from them, and every loop is bounded by what the local side does (``budget``).
Used in place of a ring's own suppression, the producer ignores ``push_used``'s answer and
signals when :meth:`ShmSignal.inject` says so; the consumer's handler drains the ring.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from enum import IntEnum
from typing import Any, Final, NamedTuple, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

from shared.errors import UsageError
from shared.virtio.ordering import full_barrier

U8Array: TypeAlias = npt.NDArray[np.uint8]

SHM_SIGNAL_MAGIC: Final = 0x58FA39DF
SHM_SIGNAL_VER: Final = 1

SHM_SIGNAL_IRQ_DTYPE: Final = np.dtype([("enabled", "u1"), ("pending", "u1"), ("dirty", "u1")])
"""Per-direction state: three bytes."""
SHM_SIGNAL_DESC_DTYPE: Final = np.dtype(
    {
        "names": ["magic", "ver", "irq"],
        "formats": ["<u4", "<u4", (SHM_SIGNAL_IRQ_DTYPE, (2,))],
        "offsets": [0, 4, 8],
        "itemsize": 16,
    }
)
"""The whole descriptor, laid out as the C struct (padded to its 4-byte alignment: 16 bytes)."""
IRQ_OFFSET: Final = 8


class Locale(IntEnum):
    """Which ``irq[]`` entry is ours: events *to* the guest are ``NORTH``, to the host ``SOUTH``."""

    NORTH = 0
    SOUTH = 1

    @property
    def remote(self) -> Locale:
        return Locale(1 - self)


class Field(IntEnum):
    """Byte offsets inside one ``irq`` entry."""

    ENABLED = 0
    PENDING = 1
    DIRTY = 2


# ---------------------------------------------------------------------------- the protocol


class Load(NamedTuple):
    """Read ``irq[locale].field``; the runner sends back 0 or 1."""

    locale: Locale
    field: Field


class Store(NamedTuple):
    """Write ``value`` (0 or 1) to ``irq[locale].field``."""

    locale: Locale
    field: Field
    value: int


class Fence(NamedTuple):
    """A full memory barrier (store->load ordering)."""


class RunHandler(NamedTuple):
    """Run the consumer's handler once (it drains the shared queue)."""


Op: TypeAlias = Load | Store | Fence | RunHandler
T = TypeVar("T")
Steps: TypeAlias = Generator[Op, int, T]
"""A protocol step sequence: yields operations, is sent load results (0/1; 0 otherwise)."""

FENCE: Final = Fence()
RUN_HANDLER: Final = RunHandler()


def inject_steps(local: Locale) -> Steps[bool]:
    """Signal the remote side; result ``True``: the caller must signal the eventfd."""
    remote = Locale(local).remote
    # Always mark dirty, whether or not a signal is needed: a polling remote looks at it.
    yield Store(remote, Field.DIRTY, 1)
    # store->load: dirty must be visible before we test enabled/pending, or the remote may
    # clear pending / enable having missed our dirty while we read the stale values.
    yield FENCE
    if not (yield Load(remote, Field.ENABLED)):
        return False
    if (yield Load(remote, Field.PENDING)):
        return False  # a signal is in flight; its wakeup loop will see dirty
    yield Store(remote, Field.PENDING, 1)
    # pending = 1 must be globally visible before the remote can be woken by our signal:
    # otherwise its wakeup could clear pending before our store lands, leaving it stuck at 1.
    yield FENCE
    return True


def enable_steps(local: Locale) -> Steps[bool]:
    """Enable our notifications; result ``True``: work arrived, run the handler now."""
    yield Store(Locale(local), Field.ENABLED, 1)
    # store->load: enabled must be visible before we re-check dirty/pending, or an inject
    # could read our stale "disabled" (no signal) while we read its stale "clean" (no work).
    yield FENCE
    if (yield Load(Locale(local), Field.DIRTY)):
        return True
    return bool((yield Load(Locale(local), Field.PENDING)))


def disable_steps(local: Locale) -> Steps[None]:
    """Disable our notifications (no fence: a late disable only lets a spurious signal in)."""
    yield Store(Locale(local), Field.ENABLED, 0)


def needs_wakeup_steps(local: Locale) -> Steps[bool]:
    """``enabled and (dirty or pending)`` for our own irq: is there anything to handle?"""
    loc = Locale(local)
    if not (yield Load(loc, Field.ENABLED)):
        return False
    if (yield Load(loc, Field.DIRTY)):
        return True
    return bool((yield Load(loc, Field.PENDING)))


def clear_dirty_steps(local: Locale) -> Steps[None]:
    """Clear ``dirty`` before a handler pass."""
    yield Store(Locale(local), Field.DIRTY, 0)
    # store->load: the clear must be visible before the handler loads the queue; a delayed
    # clear could land after the producer's next dirty = 1 and erase it while the handler
    # read the queue before that producer's data.
    yield FENCE


def redirtied_steps(local: Locale) -> Steps[bool]:
    """After a handler pass: ``enabled and dirty`` -- must the handler run again?"""
    loc = Locale(local)
    if not (yield Load(loc, Field.ENABLED)):
        return False
    return bool((yield Load(loc, Field.DIRTY)))


def ack_steps(local: Locale) -> Steps[bool]:
    """Clear ``pending`` (the signal is handled); result: is there more to handle already?"""
    yield Store(Locale(local), Field.PENDING, 0)
    # store->load: pending = 0 must be visible before we re-check dirty: a producer that read
    # the stale pending = 1 sent no signal, so we must see its dirty instead.
    yield FENCE
    return (yield from needs_wakeup_steps(local))


def wakeup_steps(local: Locale, budget: int | None = None) -> Steps[bool]:
    """The consumer's wakeup loop; result ``True``: ``budget`` handler runs were used up with
    work left (``pending`` stays set, so no signal will come: call wakeup again later)."""
    runs = 0
    more = yield from needs_wakeup_steps(local)
    while more:
        while True:
            if budget is not None and runs >= budget:
                return True
            yield from clear_dirty_steps(local)
            yield RUN_HANDLER
            runs += 1
            if not (yield from redirtied_steps(local)):
                break
        more = yield from ack_steps(local)
    return False


def run_steps(steps: Steps[T], irq: U8Array, handler: Callable[[], None] | None = None) -> T:
    """Run a step generator against ``irq`` (a ``(2, 3)`` uint8 view of the two irq entries)
    with real barriers; ``handler`` serves :class:`RunHandler`."""
    try:
        op = next(steps)
        while True:
            reply = 0
            if isinstance(op, Load):
                # Untrusted byte: anything non-zero is 1.
                reply = 1 if int(irq[op.locale, op.field]) else 0
            elif isinstance(op, Store):
                irq[op.locale, op.field] = op.value
            elif isinstance(op, Fence):
                full_barrier()
            elif handler is not None:
                handler()
            op = steps.send(reply)
    except StopIteration as stop:
        result: T = stop.value
        return result


# ---------------------------------------------------------------------------- the object


class ShmSignal:
    """One side's end of a shm-signal over a ``uint8`` view of the 16-byte descriptor.

    ``local`` says which irq entry is ours (:class:`Locale`). Nothing here signals an
    eventfd: :meth:`inject` returns whether the caller must.
    """

    __slots__ = ("_desc", "_irq", "_local")

    def __init__(self, area: U8Array, local: Locale) -> None:
        if (
            not isinstance(area, np.ndarray)
            or area.dtype != np.uint8
            or area.ndim != 1
            or area.shape[0] < SHM_SIGNAL_DESC_DTYPE.itemsize
        ):
            raise UsageError(
                f"a shm-signal needs a 1-D uint8 array of >= {SHM_SIGNAL_DESC_DTYPE.itemsize} bytes"
            )
        if not area.flags.writeable:
            raise UsageError("the shm-signal area must be writable")
        try:
            self._local = Locale(local)
        except ValueError:
            raise UsageError(f"locale must be NORTH or SOUTH, got {local!r}") from None
        self._desc = area[: SHM_SIGNAL_DESC_DTYPE.itemsize]
        self._irq = self._desc[IRQ_OFFSET : IRQ_OFFSET + 6].reshape(2, 3)

    @staticmethod
    def initialize(area: U8Array, *, enabled: bool = True) -> None:
        """Write a fresh descriptor (magic, version, both directions clean) into ``area``."""
        if not isinstance(area, np.ndarray) or area.dtype != np.uint8 or area.shape[0] < 16:
            raise UsageError("a shm-signal needs a uint8 array of >= 16 bytes")
        desc = np.zeros(1, dtype=SHM_SIGNAL_DESC_DTYPE)
        desc["magic"] = SHM_SIGNAL_MAGIC
        desc["ver"] = SHM_SIGNAL_VER
        desc["irq"]["enabled"] = 1 if enabled else 0
        area[: SHM_SIGNAL_DESC_DTYPE.itemsize] = desc.view(np.uint8)

    @property
    def local(self) -> Locale:
        return self._local

    def valid(self) -> bool:
        """Whether the descriptor carries the expected magic and version."""
        d: Any = self._desc.view(SHM_SIGNAL_DESC_DTYPE)[0]
        return int(d["magic"]) == SHM_SIGNAL_MAGIC and int(d["ver"]) == SHM_SIGNAL_VER

    def state(self, locale: Locale) -> tuple[int, int, int]:
        """``(enabled, pending, dirty)`` of ``irq[locale]`` as raw bytes (for logs, tests)."""
        e, p, d = self._irq[Locale(locale)].tolist()
        return int(e), int(p), int(d)

    # -- producer
    def inject(self) -> bool:
        """Mark the remote dirty; ``True`` if the caller must signal the eventfd."""
        return run_steps(inject_steps(self._local), self._irq)

    # -- consumer
    def enable(self) -> bool:
        """Enable our notifications; ``True`` if the caller must run the handler now."""
        return run_steps(enable_steps(self._local), self._irq)

    def disable(self) -> None:
        """Disable our notifications (the producer stops signaling; we poll)."""
        run_steps(disable_steps(self._local), self._irq)

    def wakeup(self, handler: Callable[[], None], budget: int | None = None) -> bool:
        """Run the whole wakeup loop with ``handler``; see :func:`wakeup_steps`.

        Returns ``True`` if ``budget`` (handler runs, >= 1) ran out with work left: call again.
        """
        if budget is not None:
            budget = int(budget)
            if budget < 1:
                raise UsageError(f"budget must be >= 1, got {budget}")
        return run_steps(wakeup_steps(self._local, budget), self._irq, handler)

    # -- the same loop, split so the caller drives it
    def needs_wakeup(self) -> bool:
        """``enabled and (dirty or pending)``: start (or continue) a wakeup pass."""
        return run_steps(needs_wakeup_steps(self._local), self._irq)

    def clear_dirty(self) -> None:
        """Clear ``dirty`` (with its barrier); then run the handler once."""
        run_steps(clear_dirty_steps(self._local), self._irq)

    def redirtied(self) -> bool:
        """After a handler run: ``True`` if the producer dirtied again -- run it again."""
        return run_steps(redirtied_steps(self._local), self._irq)

    def ack(self) -> bool:
        """Clear ``pending``; ``True`` if more arrived meanwhile: loop again."""
        return run_steps(ack_steps(self._local), self._irq)
