"""``python -m hostemu.devices MODEL --channel-fd N``: run one device process."""

from __future__ import annotations

import argparse

from hostemu.devices.echo import EchoModel
from hostemu.devices.runtime import DeviceModel, DeviceRuntime
from shared.channel import Channel
from shared.fds import OwnedFd
from shared.loop import ControlPipe, setup_logging

MODELS: dict[str, type[DeviceModel]] = {"echo": EchoModel}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vbusemu device process")
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--name", default="device")
    args = parser.parse_args(argv)
    setup_logging(args.name)
    runtime = DeviceRuntime(Channel.adopt(OwnedFd(args.channel_fd)), ControlPipe(),
                            MODELS[args.model]())
    return runtime.run()


if __name__ == "__main__":
    raise SystemExit(main())
