"""``python -m hostemu.devices MODEL [model args] --channel-fd N``: one device process.

A model is a module ``hostemu.devices.MODEL`` that defines ``make_model(args) ->
DeviceModel`` (``args``: the remaining command-line words, for model options such as a
disk image path). Adding a device model means adding a module; nothing here changes.
"""

from __future__ import annotations

import argparse
import importlib

from hostemu.devices.runtime import DeviceModel, DeviceRuntime
from shared.channel import Channel
from shared.errors import ConfigError
from shared.fds import OwnedFd
from shared.loop import ControlPipe, setup_logging


def load_model(name: str, args: list[str]) -> DeviceModel:
    if not name.isidentifier() or name in ("runtime", "__main__"):
        raise ConfigError(f"unknown device model {name!r}")
    try:
        module = importlib.import_module(f"hostemu.devices.{name}")
    except ModuleNotFoundError as e:
        raise ConfigError(f"unknown device model {name!r}") from e
    model: DeviceModel = module.make_model(args)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vbusemu device process")
    parser.add_argument("model")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--name", default="device")
    args, model_args = parser.parse_known_args(argv)
    setup_logging(args.name)
    model = load_model(args.model, model_args)
    runtime = DeviceRuntime(Channel.adopt(OwnedFd(args.channel_fd)), ControlPipe(), model)
    return runtime.run()


if __name__ == "__main__":
    raise SystemExit(main())
