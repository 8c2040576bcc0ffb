"""Memory ordering between the two sides of a ring, and the one fence it needs.

The two sides run in different processes (or threads) on x86-64, which is TSO: stores become
visible in program order and loads are not reordered with other loads. The one reordering x86
does is a *store followed by a load of another location*: the load may be satisfied before the
store leaves the store buffer. Hence three kinds of ordering points:

* **store -> store** (publishing): descriptor and ring-entry writes happen before the index
  write that publishes them. x86 keeps stores in order, and the compiler cannot move them
  either: each numpy assignment is a separate C call behind the interpreter, an opaque
  boundary no compiler reorders memory accesses across. So no fence is needed.
  (Linux uses ``virtio_wmb``, a compiler barrier on x86, at the same points.)
* **load -> load** (consuming): the other side's index is read before the entries it
  publishes. x86 does not reorder loads with loads (Linux: ``virtio_rmb``). No fence.
* **store -> load** (deciding whether to notify / whether to sleep): publish our index or
  re-enable notifications, *then* read the other side's event index, flags or ring index.
  x86 *may* reorder these, and then both sides can read stale values and both decide not to
  notify: a lost wakeup. numpy and CPython offer no fence, so :func:`full_barrier` executes
  a locked instruction (an uncontended :class:`threading.Lock` acquire/release: ``lock
  cmpxchg`` / ``lock xadd`` in glibc's semaphores or CPython's ``PyMutex``), which is a full
  barrier on x86.

The store->load points, each calling :func:`full_barrier` with a comment saying which race
it closes:

1. the driver's publish-then-decide-kick (:meth:`~shared.virtio.DriverRing.kick_needed`):
   ``avail.idx`` store, then ``avail_event`` / ``used.flags`` load;
2. the device's publish-then-decide-interrupt (:meth:`~shared.virtio.DeviceRing.push_used`):
   ``used.idx`` store, then ``used_event`` / ``avail.flags`` load;
3. both "re-enable, then re-check" paths
   (:meth:`~shared.virtio.DriverRing.enable_interrupts`,
   :meth:`~shared.virtio.DeviceRing.enable_notifications`): flag or event-index store, then
   the other side's ring index load;
4. the "advance my event index, then re-read the ring" refresh done while notifications are
   on (after ``get_used`` on the driver, after ``pop_batch`` on the device).

A *disable* needs no fence: a late-visible disable only lets a spurious notification
through, and spurious notifications are always allowed.

The no-lost-wakeup rule that follows: a side may sleep only after it has (1) re-enabled
notifications, (2) issued a full barrier, (3) re-checked the ring and found nothing. The
enable methods do all three and return ``True`` when work is already there -- the caller
must then process it instead of sleeping.

u16 indices and flags live at naturally aligned addresses (the device treats misaligned ring
areas as broken, the driver requires a 16-byte aligned view and aligned areas in it), so numpy
reads and writes them with single aligned moves: no torn index is ever seen. The scalar paths
(small batches) reach the same u16s through a native ``memoryview`` cast, whose item access is
also one fixed-size copy of the aligned u16 (CPython's ``PACK_SINGLE`` / ``UNPACK_SINGLE``);
they pack and unpack descriptors and used elements with ``struct``, which may store them byte
by byte -- harmless, as those are always published by a later index store (store->store
above) and read only after the index (load->load), and the ordering comments sit at the same
points in both paths. Descriptors may tear (a guest rewriting one while it is copied); the
copy is validated as a whole, so that only hurts the guest. This model is x86-specific: a
weakly ordered CPU would need real acquire/release fences.

The vbus shm-signal (:mod:`shared.shmsignal`) has the same store->load points and uses the
same :func:`full_barrier`.

The compiled kernels (:mod:`shared.virtio.kernels`) cannot rely on call boundaries: LLVM
sees the whole loop. They state every ordering explicitly with the intrinsics of
:mod:`shared.virtio.atomics` -- a *release* store publishes ``avail.idx`` / ``used.idx``
after the entries it covers, an *acquire* load reads the peer's event index or flags, and a
``seq_cst`` fence (``lock or`` / ``mfence`` on x86) sits at each store->load decision
point (:func:`~shared.virtio.kernels.device_push_used`: publish, fence, then
``used_event``). Where a kernel is handed an index the Python caller read (``pop``,
``get_used``), that read is the load->load point above. The fence is checked in the
compiled code (``tests/unit/test_atomics.py``) and by a two-process store-buffering litmus
test (``tests/fault/test_litmus.py``).
"""

from __future__ import annotations

import threading
from typing import Final

_FENCE_LOCK: Final = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier (store->load ordering), which numpy and CPython do not offer.

    An uncontended lock acquire/release executes locked read-modify-write instructions
    (glibc semaphores under CPython <= 3.12's ``Lock``, atomics in 3.13's ``PyMutex``); on x86
    a locked instruction drains the store buffer before any later load. Contention on the lock
    only makes it slower, never weaker.
    """
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()
