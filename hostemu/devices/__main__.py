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
from types import ModuleType
from typing import Any

from hostemu.devices.runtime import DeviceModel, DeviceRuntime
from shared.channel import Channel
from shared.errors import ConfigError
from shared.fds import OwnedFd
from shared.loop import Agent, ControlPipe, EventLoop, run_group, setup_logging


def _module(name: str) -> ModuleType:
    if not name.isidentifier() or name in ("runtime", "__main__"):
        raise ConfigError(f"unknown device model {name!r}")
    try:
        return importlib.import_module(f"hostemu.devices.{name}")
    except ModuleNotFoundError as e:
        raise ConfigError(f"unknown device model {name!r}") from e


def load_model(name: str, params: dict[str, Any]) -> DeviceModel:
    model: DeviceModel = _module(name).make_model(params)
    return model


def load_group(name: str, params: dict[str, Any], count: int) -> list[DeviceModel]:
    module = _module(name)
    make_group = getattr(module, "make_group", None)
    if make_group is None:
        raise ConfigError(f"device model {name!r} serves one device per process")
    models: list[DeviceModel] = make_group(params, count)
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vbusemu device process")
    parser.add_argument("model")
    parser.add_argument(
        "--channel-fd",
        type=int,
        action="append",
        required=True,
        help="a device channel; several for a model serving many devices "
        "(a switch's ports), if the model defines make_group",
    )
    parser.add_argument("--name", default="device")
    parser.add_argument("--params", default="{}", help="the model's options (JSON object)")
    args = parser.parse_args(argv)
    setup_logging(args.name)
    params = json.loads(args.params)
    try:
        if len(args.channel_fd) == 1:
            models = [load_model(args.model, params)]
        else:
            models = load_group(args.model, params, len(args.channel_fd))
    except (ConfigError, ValueError) as e:
        print(f"{args.name}: {e}", file=sys.stderr)
        return 2
    if len(models) == 1:
        runtime = DeviceRuntime(
            Channel.adopt(OwnedFd(args.channel_fd[0])), ControlPipe(), models[0]
        )
        return runtime.run()
    loop = EventLoop()
    control = ControlPipe()
    runtimes = [
        DeviceRuntime(Channel.adopt(OwnedFd(fd)), control, model, loop)
        for fd, model in zip(args.channel_fd, models, strict=True)
    ]
    runtimes[0].group = runtimes  # the control pipe's owner answers for every port
    agents: list[Agent] = list(runtimes)
    return run_group(agents, loop)


if __name__ == "__main__":
    raise SystemExit(main())
