"""The ``main`` workload: what each guest of the default topology does.

Boot the bus once, then, with every device found: print boot lines on the console; write,
flush, read back and verify the disk (``params.disk``, see :mod:`guestemu.workloads.blk`);
send frames to a peer VM and verify their echoes, or reflect the peer's frames
(``params.net``, see :mod:`guestemu.workloads.net`). Each part's result is kept under
``parts``; the workload is ok only if every part is, and ``error`` names the first
discrepancy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guestemu.drivers import GuestRam, boot, find
from guestemu.workloads import blk, net
from guestemu.workloads.console import Console
from shared import pci_layout as pl
from shared.errors import ConfigError

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

KIND = {
    pl.DEVICE_ECHO: "echo",
    pl.DEVICE_NET: "net",
    pl.DEVICE_BLK: "blk",
    pl.DEVICE_CONSOLE: "console",
}


def check_params(params: dict[str, Any]) -> None:
    """The parts' parameters, checked before anything starts (see the package): ``net``
    as the ``net`` workload checks it, ``disk`` and ``hostname`` by type."""
    for key in ("net", "disk"):
        if key in params and not isinstance(params[key], dict):
            raise ConfigError(f"{key} must be a table, not {params[key]!r}")
    if "net" in params:
        try:
            net.check_params(params["net"])
        except ConfigError as e:
            raise ConfigError(f"net.{e}") from None
    if "hostname" in params and not isinstance(params["hostname"], str):
        raise ConfigError(f"hostname must be a string, not {params['hostname']!r}")


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    check_params(params)
    ram = GuestRam(agent.memory.map)
    functions = boot(agent.vcpu)
    consoles = find(functions, pl.DEVICE_CONSOLE)
    console = Console(agent.vcpu, ram, consoles[0]) if consoles else None

    def say(text: str) -> None:
        if console is not None:
            console.write(text + "\n")

    say(f"vbusemu guest {params.get('hostname', agent.name)} booting")
    say(
        "pci: "
        + ", ".join(
            f"{f.found.slot:02x}.0 {KIND.get(f.found.device_id, '?')} "
            f"(BAR {f.found.bar_address:#x}, gsi "
            f"{','.join(str(g) for g in f.gsis.values())})"
            for f in functions
        )
    )
    parts: dict[str, dict[str, Any]] = {}
    disks = find(functions, pl.DEVICE_BLK)
    if disks:
        say("disk: write, flush, read back, verify")
        parts["blk"] = r = blk.run_on(agent, ram, disks[0], dict(params.get("disk", {})))
        say(
            f"disk: {'ok' if r['ok'] else 'FAILED: ' + str(r['error'])} "
            f"({r['written_bytes'] >> 10} KiB written, {r['read_bytes'] >> 10} KiB verified)"
        )
    nets = find(functions, pl.DEVICE_NET)
    if nets and "net" in params:
        say(f"net: {params['net'].get('role', 'send')}")
        parts["net"] = r = net.run_port(agent, ram, nets[0], dict(params["net"]))
        say(f"net: {'ok' if r['ok'] else 'FAILED: ' + str(r['error'])} ({r['frames']} frames)")
    if console is not None:
        say("guest done")
        console.flush()
        parts["console"] = {"ok": True, **console.stats()}
    error = next((f"{name}: {p['error']}" for name, p in parts.items() if not p.get("ok")), None)
    return {"workload": "main", "ok": error is None and bool(parts), "error": error, "parts": parts}
