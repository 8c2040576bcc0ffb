"""The ``truncate`` workload: a hostile guest tries to shrink its own RAM.

Every process of a VM maps the same memory object. If one could ``ftruncate`` it, every
other process touching a page past the new end would die of SIGBUS -- a guest killing its
device, or a device killing its switch's other VMs. The VMM creates guest RAM as a
size-sealed memfd (:mod:`shared.memory`), so the kernel refuses.

The workload proves the echo path with ``frames`` good frames, then tries, on the fd of
every memory slot it was given: ``ftruncate`` to 0, to half the size and to twice the size,
and to add seals / remove the size seal. It then sends ``frames`` more frames. ``ok`` when
the memory reports sealed, every attempt was refused, and both transfers went through
(the device, which maps the same pages, is alive and serving).
Result: ``ok``, ``sealed`` (per slot), ``attempts`` (``"slot:what" -> "refused: EPERM"`` or
``"allowed"``), ``frames``, ``error``.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from guestemu.workloads.echo import EchoSession
from shared.errors import VbusError

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent


def _attempt(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as e:
        return f"refused: {errno.errorcode.get(e.errno or 0, str(e.errno))}"
    return "allowed"


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    frames = int(params.get("frames", 64))
    result: dict[str, Any] = {
        "workload": "truncate",
        "ok": False,
        "sealed": {},
        "attempts": {},
        "frames": 0,
        "error": None,
    }
    try:
        session = EchoSession(agent, 64, batch=8)
        error = session.transfer(frames)
        if error is not None:
            result["error"] = f"before the attempts: {error}"
            return result
        for slot, region in agent.memory.regions().items():
            fd, size = region.fd.fd, region.size
            result["sealed"][str(slot)] = region.sealed
            attempts: dict[str, Callable[[], object]] = {
                "shrink_to_0": functools.partial(os.ftruncate, fd, 0),
                "shrink_to_half": functools.partial(os.ftruncate, fd, size // 2),
                "grow_to_double": functools.partial(os.ftruncate, fd, size * 2),
                "add_write_seal": functools.partial(
                    fcntl.fcntl, fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE
                ),
            }
            for what, action in attempts.items():
                result["attempts"][f"{slot}:{what}"] = _attempt(action)
        agent.emit("truncate_attempted", attempts=result["attempts"])
        error = session.transfer(frames)
        result["frames"] = session.received
        allowed = [k for k, v in result["attempts"].items() if v == "allowed"]
        if error is not None:
            result["error"] = f"after the attempts: {error}"
        elif not result["sealed"] or not all(result["sealed"].values()):
            result["error"] = f"guest memory is not sealed: {result['sealed']}"
        elif allowed:
            result["error"] = f"allowed: {allowed}"
        else:
            result["ok"] = True
    except VbusError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result
