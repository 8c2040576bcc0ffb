"""Guest workloads: what a booted guest does with its devices.

Each module here exposes ``run(agent, params) -> dict``: it boots the drivers it needs on
the guest's vCPU, does its work, and returns a JSON-able result with at least ``ok`` and
``error`` (the first discrepancy, or None). ``guestemu.guest --workload NAME --params JSON``
runs module ``NAME``; the result is reported as a ``workload_done`` event.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

Workload = Callable[["GuestAgent", dict[str, Any]], dict[str, Any]]


def load(name: str) -> Workload:
    """The ``run`` function of workload ``name`` (a module of this package)."""
    if not name.isidentifier() or name.startswith("_") or name == "frames":
        raise ConfigError(f"unknown workload {name!r}")
    try:
        module = importlib.import_module(f"guestemu.workloads.{name}")
    except ModuleNotFoundError as e:
        raise ConfigError(f"unknown workload {name!r}") from e
    run: Workload = module.run
    return run
