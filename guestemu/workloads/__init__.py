"""Guest workloads: what a booted guest does with its devices.

Each module here exposes ``run(agent, params) -> dict``: it boots the drivers it needs on
the guest's vCPU, does its work, and returns a JSON-able result with at least ``ok`` and
``error`` (the first discrepancy, or None). ``guestemu.guest --workload NAME --params JSON``
runs module ``NAME``; the result is reported as a ``workload_done`` event.

A module may also expose ``check_params(params)``: it raises
:class:`~shared.errors.ConfigError` naming the parameter that is wrong. The topology
calls it before anything starts (so a typo is an exit 2, not a failed run), and the
workload's ``run`` calls it first too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

Workload = Callable[["GuestAgent", dict[str, Any]], dict[str, Any]]


def check_int(params: dict[str, Any], key: str, minimum: int) -> None:
    """``params[key]``, if given, is an integer of at least ``minimum``."""
    if key not in params:
        return
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, not {value!r}")


def check_positive(params: dict[str, Any], key: str) -> None:
    """``params[key]``, if given, is a number above 0."""
    if key not in params:
        return
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{key} must be a number above 0, not {value!r}")


def check_choice(params: dict[str, Any], key: str, choices: tuple[str, ...]) -> None:
    """``params[key]``, if given, is one of ``choices``."""
    if key in params and params[key] not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, not {params[key]!r}")


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
