"""The ``storm`` workload: a doorbell storm (CVE-2019-3900's shape).

Brings an echo device up, then rings queue 0's doorbell as fast as the vCPU can for
``seconds`` -- each ring an MMIO write the ioeventfd turns into an eventfd signal, no exit
-- sending a batch of ``frames_every``-th real frames in between so the device's work is
real too. The device must bound its work per pass (kicks coalesce in the eventfd counter)
and keep every other VM and the broker responsive; this guest checks that its own frames
still all come back. Result: ``kicks``, ``kicks_per_s``, ``frames`` (sent and verified).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from guestemu.workloads.echo import EchoSession
from shared.errors import VbusError

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    seconds = float(params.get("seconds", 5.0))
    frames_every = int(params.get("frames_every", 20_000))
    result: dict[str, Any] = {
        "workload": "storm",
        "ok": False,
        "kicks": 0,
        "frames": 0,
        "error": None,
    }
    try:
        session = EchoSession(agent, 64, batch=8)
        error = session.transfer(8)
        if error is not None:
            result["error"] = f"before the storm: {error}"
            return result
        agent.emit("storm_started")
        io, vcpu = agent.io, agent.vcpu
        addr, queue = session.tx.notify_addr, session.tx.index
        kicks = 0
        start = time.monotonic()
        end = start + seconds
        while error is None and time.monotonic() < end:
            for _ in range(frames_every):
                # the vCPU's write path without its per-write bookkeeping: as fast as it goes
                if not io.write(False, addr, 4, queue):
                    vcpu.write(addr, 4, queue)
            kicks += frames_every
            error = session.transfer(8, timeout=30.0)  # real work between the bursts
        elapsed = time.monotonic() - start
        result.update(
            kicks=kicks,
            kicks_per_s=kicks / max(elapsed, 1e-9),
            frames=session.received,
            error=error,
            ok=error is None,
        )
    except VbusError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result
