"""Compile (or load from numba's cache) every data-path kernel, with the argument types the
rings really pass: ``python -m shared.virtio.warm``.

The launcher runs this once before it starts guests and devices, so that they load the
kernels from the cache instead of each compiling them (seconds of CPU apiece on a first
run). When compiling takes longer than a moment -- the first run after an install or a
change -- it says so in one line on stderr; a warm cache prints nothing.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from shared.memory import GuestMemoryMap

SLOW = 0.5  # seconds: say nothing for a compile shorter than this


def exercise() -> None:
    """Two rings of each side on the kernel path, driven through every kernel."""
    q = 16
    from shared.virtio import DeviceRing, DriverRing, RingLayout

    layout = RingLayout(q)
    ram = np.zeros(1 << 16, dtype=np.uint8)
    mem = GuestMemoryMap()
    mem.add(0, 0, ram)
    pairs = []
    for base in (0, 0x2000):
        driver = DriverRing(
            mem.translate(base, layout.size), layout, event_idx=True, fast_path=False, jit=True
        )
        device = DeviceRing.from_layout(
            mem, base, layout, event_idx=True, fast_path=False, jit=True
        )
        pairs.append((driver, device))
    (tx_driver, tx), (rx_driver, rx) = pairs
    addrs = np.arange(8, dtype=np.uint64) * 64 + 0x8000
    lens = np.full(8, 64, dtype=np.uint64)
    for writable in (False, True, np.array([True, False] * 4)):
        tx_driver.add_batch(addrs, lens, writable)
        tx_driver.kick_needed()
        batch = tx.pop_batch()
        tx.push_used(batch.heads, batch.writable_lens)
        tx_driver.get_used()
    tx_driver.add_batch(addrs, lens, False)
    rx_driver.add_batch(addrs + np.uint64(0x1000), lens, True)
    sent, room = tx.pop_batch(), rx.pop_batch()
    tx.read_payloads(sent, 64)
    tx.read_payloads(sent, 64, out=np.empty((8, 64), dtype=np.uint8))
    tx.read_payloads(sent, 32, out=np.empty((8, 64), dtype=np.uint8))
    rx.push_used(room.heads, tx.copy_payloads(sent, rx, room, 64))
    tx.push_used(sent.heads, np.zeros(len(sent), dtype=np.int64))
    # the fused steps, with a pool of 64-byte buffers for each driver ring
    sink = np.empty(q * 64, dtype=np.uint8)
    pools = []
    for base in (0x8000, 0x9000):
        data = ram[base : base + q * 64].reshape(q, 64)
        pools.append((data, np.arange(q - 1, -1, -1, dtype=np.int64), np.full(q, -1), base))
    tx_kernels, rx_kernels, dev_kernels = tx_driver.kernels, rx_driver.kernels, tx.kernels
    assert tx_kernels is not None and rx_kernels is not None and dev_kernels is not None
    tx_driver.get_used()
    rx_driver.get_used()
    data, stack, slot_of, base = pools[0]
    tx_kernels.send_frames(tx_driver, data, stack, q, slot_of, base, 0, 4, 8)
    dev_kernels.consume(tx, sink, 0, q, 1 << 24)
    data, stack, slot_of, base = pools[1]
    rx_kernels.receive_frames(rx_driver, data, stack, q, slot_of, base, 0)
    dev_kernels.forward(tx, rx, q, 1 << 24)


_KERNEL_MODULES = (
    "shared.virtio.kernels",
    "shared.virtio.fused",
    "shared.virtio.fused_device",
)


def compiling() -> bool:
    """Whether a kernel loaded so far missed numba's cache (is being or was compiled)."""
    for name in _KERNEL_MODULES:
        module = sys.modules.get(name)
        for value in vars(module).values() if module is not None else ():
            stats = getattr(value, "stats", None)
            if stats is not None and hasattr(stats, "cache_misses") and stats.cache_misses:
                return True
    return False


def main() -> int:
    done = threading.Event()

    def announce() -> None:
        # Only a real compile is announced: loading from the cache can take a while on a
        # busy machine too, and then there is nothing to say.
        if done.wait(SLOW):
            return
        while not compiling():
            if done.wait(0.25):
                return
        print(
            "vbusemu: compiling the data-path kernels (first run; later runs load "
            "them from the cache) ...",
            file=sys.stderr,
            flush=True,
        )

    threading.Thread(target=announce, daemon=True).start()
    exercise()
    done.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
