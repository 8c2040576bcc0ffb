"""``python -m hostemu.devices MODEL [model args] --channel-fd N``: one device process.

A model is a module ``hostemu.devices.MODEL`` that defines ``make_model(params) ->
DeviceModel`` (``params``: the JSON object given with ``--params``, for model options such
as a disk image path), and the constants the VMM publishes for it: ``DEVICE_ID``,
``QUEUES``, ``VECTORS`` (and optionally ``device_config(params) -> bytes``, the
device-specific config-space bytes). Adding a device model means adding a module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from hostemu.devices.runtime import DeviceModel, DeviceRuntime
from shared.channel import Channel
from shared.errors import ConfigError
from shared.fds import OwnedFd
from shared.loop import ControlPipe, setup_logging


def load_model(name: str, params: dict[str, Any]) -> DeviceModel:
    if not name.isidentifier() or name in ("runtime", "__main__"):
        raise ConfigError(f"unknown device model {name!r}")
    try:
        module = importlib.import_module(f"hostemu.devices.{name}")
    except ModuleNotFoundError as e:
        raise ConfigError(f"unknown device model {name!r}") from e
    model: DeviceModel = module.make_model(params)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vbusemu device process")
    parser.add_argument("model")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--name", default="device")
    parser.add_argument("--params", default="{}", help="the model's options (JSON object)")
    args = parser.parse_args(argv)
    setup_logging(args.name)
    try:
        model = load_model(args.model, json.loads(args.params))
    except (ConfigError, ValueError) as e:
        print(f"{args.name}: {e}", file=sys.stderr)
        return 2
    runtime = DeviceRuntime(Channel.adopt(OwnedFd(args.channel_fd)), ControlPipe(), model)
    return runtime.run()


if __name__ == "__main__":
    raise SystemExit(main())
