"""The device process skeleton: attach to one vbus device and produce shm-signals.

Started by a VMM (or a test) with a scoped device channel inherited as an fd::

    python -m hostemu.device --channel-fd N [--name dev0]

Once attached, the broker hands it every shm-signal binding of the device as a notice
carrying the real eventfd: this process is the *producer* of the 2009 scenario ("vbus
is free to produce events on its eventfd until it gets a SHMSIGNAL_DEASSIGN request").
On a detach notice it stops signaling, closes its copy, then acknowledges.

Control commands (JSON lines on stdin): ``signal {sigid, count}`` (writes 1 to the
eventfd ``count`` times), ``stats``, ``quit``.
"""

from __future__ import annotations

import argparse
from typing import Any

from shared import wire
from shared.channel import Channel
from shared.errors import UsageError
from shared.fds import EventNotifier, OwnedFd
from shared.loop import Agent, ControlPipe, EventLoop, setup_logging


class DeviceAgent(Agent):
    name = "device"

    def __init__(
        self, channel: Channel, control: ControlPipe, loop: EventLoop | None = None
    ) -> None:
        super().__init__(channel, control, loop)
        self.signals: dict[int, tuple[int, EventNotifier]] = {}  # sigid -> (binding, end)
        self.signaled: dict[int, int] = {}
        self.detached: list[dict[str, Any]] = []

    def handle_notice(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.ShmSignalAttach):
            self.signals[msg.sigid] = (msg.binding, EventNotifier(msg.fds[0].move()))
            self.emit("shmsignal_attached", binding=msg.binding, sigid=msg.sigid)
        elif isinstance(msg, wire.Detach):
            event: dict[str, Any] = {
                "binding": msg.binding,
                "reason": wire.DetachReason(msg.reason).name.lower(),
            }
            for sigid, (binding, notifier) in list(self.signals.items()):
                if binding == msg.binding:
                    notifier.close()
                    del self.signals[sigid]
                    event["sigid"] = sigid
            self.channel.ack_detach(msg.binding)  # after we can no longer signal it
            self.detached.append(event)
            self.emit("detached", **event)
        elif isinstance(msg, wire.PeerGone) and msg.kind in (
            wire.PeerKind.DEVICE,
            wire.PeerKind.VM,
        ):
            self.loop.stop()
        msg.close_fds()

    def signal(self, sigid: int, count: int) -> int:
        entry = self.signals.get(sigid)
        if entry is None:
            raise UsageError(f"sigid {sigid} is not bound (detached or never assigned)")
        sent = 0
        for _ in range(count):
            if not entry[1].notify(1):
                break  # saturated: the consumer is not draining
            sent += 1
        self.signaled[sigid] = self.signaled.get(sigid, 0) + sent
        return sent

    def handle_command(self, cmd: dict[str, Any]) -> dict[str, Any] | None:
        name = cmd.get("cmd")
        if name == "signal":
            return {"signaled": self.signal(int(cmd.get("sigid", 0)), int(cmd.get("count", 1)))}
        if name == "stats":
            return {
                "bound": sorted(self.signals),
                "detached": self.detached,
                "signaled": {str(k): v for k, v in self.signaled.items()},
            }
        raise KeyError(name)

    def shutdown(self) -> None:
        for _, notifier in self.signals.values():
            notifier.close()
        self.signals.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vbusemu device process")
    parser.add_argument(
        "--channel-fd",
        type=int,
        required=True,
        help="inherited fd of the device channel the VMM opened",
    )
    parser.add_argument("--name", default="device")
    args = parser.parse_args(argv)
    setup_logging(args.name)
    agent = DeviceAgent(Channel.adopt(OwnedFd(args.channel_fd)), ControlPipe())
    return agent.run()


if __name__ == "__main__":
    raise SystemExit(main())
