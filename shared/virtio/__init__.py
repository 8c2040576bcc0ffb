"""The virtio 1.x split virtqueue: layout as data, the driver (guest) side and the device
(host) side, as pure code over numpy views of guest memory.

Nothing here opens a socket, starts a process or signals an eventfd. Ring operations take
memory (a numpy view or a :class:`~shared.memory.GuestMemoryMap`) and *return* whether the
other side needs a notification; the caller owns the eventfds (like rust-vmm virtio-queue).

Modules, each with its own invariants, in dependency order:

* :mod:`~shared.virtio.layout` -- the three areas, their offsets, sizes and alignment (the
  only place they are computed), views of their fields, :func:`need_event`;
* :mod:`~shared.virtio.ordering` -- the memory-ordering model and :func:`full_barrier`;
* :mod:`~shared.virtio.args` -- checking the caller's arguments (our own mistakes);
* :mod:`~shared.virtio.batch` -- :class:`Batch`, the chains one device pass took;
* :mod:`~shared.virtio.slots` -- guest memory slots as lookup tables;
* :mod:`~shared.virtio.chains` -- walking and validating the guest's chains (the trust
  boundary), the fast checks beside the reference check;
* :mod:`~shared.virtio.payload` -- copying payloads between batches, arrays and rings;
* :mod:`~shared.virtio.driver` -- :class:`DriverRing`;
* :mod:`~shared.virtio.device` -- :class:`DeviceRing`;

and the compiled path (numba; imported only by rings built with ``jit=True``):
:mod:`~shared.virtio.atomics` (release/acquire/fence intrinsics),
:mod:`~shared.virtio.kernels` (one ring operation per call), :mod:`~shared.virtio.fused`
and :mod:`~shared.virtio.fused_device` (one step of a packet workload per call),
:mod:`~shared.virtio.pointers` (entering a kernel with one table of arrays),
:mod:`~shared.virtio.compiled` (the rings' other half: their state in and out of the
kernels) and :mod:`~shared.virtio.warm` (compile once).

Ownership
---------
Only the driver writes the descriptor table and the available ring, only the device writes
the used ring (the driver initialises the whole area in :meth:`DriverRing.reset`, before the
device runs). Neither side keeps state *in* the other's area: each keeps private shadows of
its indices, flags and bookkeeping. Each side trusts nothing the other wrote: a misbehaving
peer marks the ring **broken** (sticky until ``reset()``), never raises into the caller.

Theory of operation
-------------------
Driver: take free descriptors, fill them, write their heads into ``avail.ring[avail.idx %
Q]``, then publish ``avail.idx += n``; ask :meth:`DriverRing.kick_needed` whether to notify
the device. Device: read ``avail.idx`` once, take the heads between its private
``last_avail`` and it, read every descriptor once into a private copy and validate it, do
the I/O, then write ``{id, len}`` into ``used.ring[used.idx % Q]`` and publish ``used.idx +=
n``; :meth:`DeviceRing.push_used` returns whether to interrupt the driver. The driver reads
the used entries between its ``last_used`` and ``used.idx`` and recycles those chains'
descriptors.

Notification suppression (both directions, virtio §2.7.7 and §2.7.10):

* without ``VIRTIO_F_EVENT_IDX``: ``avail.flags`` bit ``NO_INTERRUPT`` (driver: "don't
  interrupt me") and ``used.flags`` bit ``NO_NOTIFY`` (device: "don't kick me");
* with ``EVENT_IDX`` both flags stay 0. The driver writes ``used_event`` (interrupt me once
  ``used.idx`` passes it) and the device writes ``avail_event`` (kick me once ``avail.idx``
  passes it); a side notifies iff :func:`need_event` ``(event, new, old)``, i.e. the event
  index lies in ``[old, new)`` modulo ``2**16``. To *disable* notifications with EVENT_IDX a
  side leaves its event index one behind its own position, so the other side's next batch
  never crosses it; it is refreshed on every pass.

A side may sleep only after re-enabling notifications, a full barrier and a re-check of the
ring (:mod:`~shared.virtio.ordering`): the enable methods
(:meth:`DriverRing.enable_interrupts`, :meth:`DeviceRing.enable_notifications`) do all three
and return ``True`` when work is already there -- the caller must then process it instead of
sleeping. Spurious notifications are always allowed and both sides tolerate them.

Fast paths: operations on a few chains (:data:`SCALAR_MAX`, :data:`DRIVER_SCALAR_MAX`) use
plain Python ints instead of numpy calls; they read the same bytes once, make the same checks
in the same order and leave the same state as the vectorized paths, which remain the
reference. Both rings take ``fast_path=False`` to run the vectorized paths only.
"""

from shared.virtio.batch import Batch, Segment
from shared.virtio.chains import MAX_BUFFER_LEN
from shared.virtio.device import SCALAR_MAX, DeviceRing
from shared.virtio.driver import DRIVER_SCALAR_MAX, DriverRing
from shared.virtio.layout import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    DESC_DTYPE,
    INDEX_MASK,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    USED_ELEM_DTYPE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    RingLayout,
    need_event,
    placement_problem,
    ring_area_sizes,
    valid_queue_size,
)
from shared.virtio.ordering import full_barrier

__all__ = [
    "AVAIL_ALIGN",
    "DESC_ALIGN",
    "DESC_DTYPE",
    "DRIVER_SCALAR_MAX",
    "INDEX_MASK",
    "MAX_BUFFER_LEN",
    "MAX_QUEUE_SIZE",
    "SCALAR_MAX",
    "USED_ALIGN",
    "USED_ELEM_DTYPE",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_USED_F_NO_NOTIFY",
    "Batch",
    "DeviceRing",
    "DriverRing",
    "RingLayout",
    "Segment",
    "full_barrier",
    "need_event",
    "placement_problem",
    "ring_area_sizes",
    "valid_queue_size",
]
