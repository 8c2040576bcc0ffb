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

SLOW = 0.5  # seconds: longer than loading from the cache takes


def exercise() -> None:
    """One ring of each side on the kernel path, driven through every kernel."""
    q = 16
    from shared.virtio import DeviceRing, DriverRing, RingLayout

    layout = RingLayout(q)
    ram = np.zeros(1 << 16, dtype=np.uint8)
    mem = GuestMemoryMap()
    mem.add(0, 0, ram)
    driver = DriverRing(mem.translate(0, layout.size), layout, event_idx=True,
                        fast_path=False, jit=True)
    device = DeviceRing.from_layout(mem, 0, layout, event_idx=True, fast_path=False,
                                    jit=True)
    addrs = np.arange(8, dtype=np.uint64) * 64 + 0x8000
    for writable in (False, True, np.array([True, False] * 4)):
        driver.add_batch(addrs, np.full(8, 64, dtype=np.uint64), writable)
        driver.kick_needed()
        batch = device.pop_batch()
        device.push_used(batch.heads, batch.writable_lens)
        driver.get_used()


def main() -> int:
    done = threading.Event()

    def announce() -> None:
        if not done.wait(SLOW):
            print("vbusemu: compiling the data-path kernels (first run; later runs load "
                  "them from the cache) ...", file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    exercise()
    done.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
