"""Topology files: a TOML description of VMs, their devices, workloads and switches.

:func:`load` parses and validates a file into a :class:`Topology` whose ``vms`` are the
VMM's own :class:`~hostemu.vmm.VmSpec`; :func:`to_vmm_spec` turns it into the JSON list
``python -m hostemu.vmm --spec`` takes. Example::

    policy = "refcount"                 # broker release policy: "hup" | "refcount"

    [[vm]]
    name = "a"                          # [A-Za-z0-9][A-Za-z0-9_-]*, at most 32 characters
    memory_mib = 16                     # 1..4096, default 16
    gsis = 32                           # interrupt lines, default 32
    cpus = [0]                          # CPUs the guest process may run on (default: any)
    workload = { name = "echo", count = 2000 }   # every key but `name` is a parameter
    [[vm.device]]
    name = "echo0"
    model = "echo"                      # a module of hostemu.devices
    params = { }                        # the model's options (optional)
    queue_size_max = 256                # optional
    restarts = 0                        # times the VMM restarts it if it dies (default 0)
    cpus = [1]                          # CPUs the device process may run on (default: any)

    [[switch]]
    name = "sw0"
    model = "venet"                     # default
    ports = ["a/net0", "b/net0"]        # "vm/device"

Invariants
----------
* Validation is complete before anything is returned and nothing is started by this
  module: a bad file raises :class:`TopologyError` (a
  :class:`~shared.errors.ConfigError`) listing *every* problem found, each prefixed by
  the path of the offending field (``vm[1].device[0].model: unknown model 'foo' ...``).
* Unknown keys are errors at every level -- a typo must never silently become a default
  -- except inside ``params`` tables and ``workload``, whose keys belong to the model or
  workload (they validate them: models through their ``device_config`` here, workloads
  when they run).
* Known models and workloads are discovered as modules of :mod:`hostemu.devices` and
  :mod:`guestemu.workloads`, so one added later is accepted without touching this file.
  A device's shape (its MSI vectors, which must fit in the VM's gsis) and its config
  bytes are computed here exactly as the VMM will, so a model rejecting its params fails
  the file, not a half-started host.
* Relative paths in device params (keys ``image``, ``path``, ``*_path``, and any a model
  lists in its ``PATH_PARAMS``) are resolved against the directory of the topology file,
  so a topology runs the same from any working directory.
* Switch ports: a model defining ``make_group`` serves several devices from one process
  (a switch). Each of its devices must be a port of exactly one ``[[switch]]`` of that
  model; its ``params.port`` is assigned here (its index in the switch's ``ports``) and
  may not be set by hand.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib
import json
import os
import pkgutil
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from hostemu.vmm import DeviceSpec, SwitchSpec, VmSpec
from shared.errors import ConfigError
from shared.pci_layout import MAX_FUNCTIONS
from shared.virtio import valid_queue_size
from shared.wire import Policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
"""VM, device and switch names: safe in process names, argv and ``vm/device`` ports."""
MAX_MEMORY_MIB: Final = 4096
MAX_GSIS: Final = 1024
"""The broker's limit on a VM's interrupt lines (``hostemu.broker.table.MAX_GSI``)."""
DEFAULT_MEMORY_MIB: Final = 16
DEFAULT_GSIS: Final = 32
DEFAULT_SWITCH_MODEL: Final = "venet"
PATH_KEYS: Final = frozenset({"image", "path"})
PATH_SUFFIX: Final = "_path"

TOP_KEYS: Final = frozenset({"policy", "vm", "switch"})
VM_KEYS: Final = frozenset({"name", "memory_mib", "gsis", "workload", "device", "cpus"})
DEVICE_KEYS: Final = frozenset({"name", "model", "params", "queue_size_max", "restarts", "cpus"})
MAX_RESTARTS: Final = 1_000_000
SWITCH_KEYS: Final = frozenset({"name", "model", "ports"})
_NOT_MODELS: Final = frozenset({"runtime", "__main__"})


class TopologyError(ConfigError):
    """A topology file is invalid; ``problems`` lists each as ``"field.path: what"``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        if len(problems) == 1:
            text = f"{source}: {problems[0]}"
        else:
            text = f"{source}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)
        super().__init__(text)


@dataclass(frozen=True)
class WorkloadSpec:
    """What a VM's guest runs: module ``guestemu.workloads.<name>`` with ``params``."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def argv(self) -> tuple[str, ...]:
        """The guest process arguments that run it."""
        return ("--workload", self.name, "--params", json.dumps(self.params, sort_keys=True))


@dataclass(frozen=True)
class Topology:
    """A validated topology: the VMM's specs plus what the launcher needs (the broker's
    release policy) and the structured workloads (``vms[i].workload`` holds their argv)."""

    vms: list[VmSpec]
    policy: Policy = Policy.REFCOUNT
    switches: list[SwitchSpec] = field(default_factory=list)
    workloads: dict[str, WorkloadSpec | None] = field(default_factory=dict)  # by VM name
    source: Path | None = None


# ---------------------------------------------------------------------------- discovery


def _model_module(name: str) -> ModuleType | None:
    """``hostemu.devices.<name>`` if it is a device model, else None (import errors raise)."""
    if not name.isidentifier() or name.startswith("_") or name in _NOT_MODELS:
        return None
    try:
        module = importlib.import_module(f"hostemu.devices.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"hostemu.devices.{name}":
            return None
        raise
    if not all(hasattr(module, a) for a in ("DEVICE_ID", "QUEUES", "VECTORS")):
        return None
    if not (hasattr(module, "make_model") or hasattr(module, "make_group")):
        return None
    return module


def _candidates(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def known_models() -> list[str]:
    """Every device model module there is now (helpers and broken modules left out)."""
    out = []
    for name in _candidates("hostemu.devices"):
        try:
            if _model_module(name) is not None:
                out.append(name)
        except Exception:  # a half-written model must not hide the others
            continue
    return out


def _workload_ok(name: str) -> bool:
    from guestemu.workloads import load as load_workload

    try:
        return callable(load_workload(name))
    except (ConfigError, AttributeError):
        return False


def known_workloads() -> list[str]:
    """Every workload the guest can run now (``guestemu.workloads`` modules with ``run``)."""
    out = []
    for name in _candidates("guestemu.workloads"):
        try:
            if _workload_ok(name):
                out.append(name)
        except Exception:  # as in known_models
            continue
    return out


# ---------------------------------------------------------------------------- checking

_TOML_TYPES: Final[list[tuple[type, str]]] = [
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
    (datetime.datetime, "datetime"),
    (datetime.date, "date"),
    (datetime.time, "time"),
]


def _kind(value: object) -> str:
    for t, name in _TOML_TYPES:  # bool before int: True is an int in Python
        if isinstance(value, t):
            return name
    return type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Checker:
    """Collects problems; every ``want_*`` returns None (and records why) on a bad value."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, problem: str) -> None:
        self.problems.append(f"{path}: {problem}")

    def keys(
        self,
        table: dict[str, Any],
        allowed: Iterable[str],
        path: str,
        outer: Iterable[str] = (),
        outer_header: str = "",
    ) -> None:
        """Unknown keys are problems. ``outer``: the enclosing table's keys -- TOML puts
        every key written after ``[[outer_header]]`` into that table, a classic slip."""
        allowed = sorted(allowed)
        for key in table:
            if key in allowed:
                continue
            if key in outer:
                self.fail(
                    _join(path, key),
                    f"belongs to the enclosing table: keys written "
                    f"after [[{outer_header}]] go into it, so move {key!r} above it",
                )
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(_join(path, key), f"unknown key{hint}; allowed: {', '.join(allowed)}")

    def want_table(self, value: object, path: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.fail(path, f"must be a table, got {_kind(value)}")
        return None

    def want_tables(self, value: object, path: str, header: str) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.fail(path, f"must be an array of tables ([[{header}]]), got {_kind(value)}")
            return []
        return value

    def want_str(self, value: object, path: str) -> str | None:
        if isinstance(value, str):
            return value
        self.fail(path, f"must be a string, got {_kind(value)} {value!r}")
        return None

    def want_int(self, value: object, path: str, lo: int, hi: int) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
            return value
        self.fail(path, f"must be an integer {lo}..{hi}, got {_kind(value)} {value!r}")
        return None

    def want_cpus(self, value: object, path: str) -> tuple[int, ...]:
        """A list of CPUs this machine lets us use (checked here, where the file is read:
        a topology written for a bigger machine fails before anything starts)."""
        usable = sorted(os.sched_getaffinity(0))
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            if set(value) <= set(usable):
                return tuple(value)
            self.fail(
                path,
                f"CPUs {sorted(set(value) - set(usable))} are not usable here (usable: {usable})",
            )
        else:
            self.fail(
                path, f"must be a non-empty list of CPU numbers, got {_kind(value)} {value!r}"
            )
        return ()

    def want_name(self, table: dict[str, Any], path: str) -> str | None:
        if "name" not in table:
            self.fail(_join(path, "name"), "missing (every entry needs a name)")
            return None
        name = self.want_str(table["name"], _join(path, "name"))
        if name is not None and not NAME_RE.fullmatch(name):
            self.fail(
                _join(path, "name"),
                f"{name!r} is not a valid name (1-32 of A-Z a-z 0-9 _ -, not starting with _ or -)",
            )
            return None
        return name

    def json_safe(self, value: object, path: str) -> None:
        """Params travel as JSON: TOML dates and times cannot."""
        if isinstance(value, dict):
            for k, v in value.items():
                self.json_safe(v, _join(path, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self.json_safe(v, f"{path}[{i}]")
        elif isinstance(value, datetime.date | datetime.time):
            self.fail(path, f"a TOML {_kind(value)} cannot be passed as a parameter (use a string)")


@dataclass
class _Device:
    path: str
    name: str
    model: str | None
    params: dict[str, Any]
    queue_size_max: int | None
    module: ModuleType | None = None
    restarts: int = 0
    cpus: tuple[int, ...] = ()


@dataclass
class _Vm:
    path: str
    name: str | None
    memory_mib: int
    gsis: int | None
    workload: WorkloadSpec | None
    devices: list[_Device]
    cpus: tuple[int, ...] = ()


def _is_path_key(key: str, module: ModuleType | None) -> bool:
    extra = getattr(module, "PATH_PARAMS", ())
    return key in PATH_KEYS or key.endswith(PATH_SUFFIX) or key in extra


def _resolve_paths(c: _Checker, dev: _Device, base: Path) -> None:
    for key, value in list(dev.params.items()):
        if not _is_path_key(key, dev.module) or not isinstance(value, str):
            continue
        if not value:
            c.fail(f"{dev.path}.params.{key}", "an empty path")
            continue
        p = Path(value).expanduser()
        # relative to the topology file, not to wherever the host happens to be started
        dev.params[key] = os.path.normpath(p if p.is_absolute() else base / p)


def _parse_device(c: _Checker, raw: dict[str, Any], path: str) -> _Device | None:
    c.keys(raw, DEVICE_KEYS, path, VM_KEYS - DEVICE_KEYS, "vm.device")
    name = c.want_name(raw, path)
    model: str | None = None
    if "model" not in raw:
        c.fail(f"{path}.model", "missing (which device model?)")
    elif (m := c.want_str(raw["model"], f"{path}.model")) is not None:
        model = m
    params: dict[str, Any] = {}
    if "params" in raw and (t := c.want_table(raw["params"], f"{path}.params")) is not None:
        params = dict(t)
        c.json_safe(params, f"{path}.params")
    qmax = None
    if "queue_size_max" in raw:
        v = raw["queue_size_max"]
        if valid_queue_size(v):
            qmax = int(v)
        else:
            c.fail(
                f"{path}.queue_size_max", f"must be a power of two 1..32768, got {_kind(v)} {v!r}"
            )
    restarts = c.want_int(raw.get("restarts", 0), f"{path}.restarts", 0, MAX_RESTARTS)
    cpus = c.want_cpus(raw["cpus"], f"{path}.cpus") if "cpus" in raw else ()
    if name is None:
        return None
    return _Device(path, name, model, params, qmax, restarts=restarts or 0, cpus=cpus)


def _parse_workload(c: _Checker, raw: object, path: str) -> WorkloadSpec | None:
    if isinstance(raw, str):
        raw = {"name": raw}  # shorthand: workload = "console"
    table = c.want_table(raw, path)
    if table is None:
        return None
    if "name" not in table:
        c.fail(f"{path}.name", "missing (which workload?)")
        return None
    name = c.want_str(table["name"], f"{path}.name")
    if name is None:
        return None
    params = {k: v for k, v in table.items() if k != "name"}
    c.json_safe(params, path)
    try:
        ok = _workload_ok(name)
    except Exception as e:  # a broken workload module is a problem of this topology
        c.fail(f"{path}.name", f"workload {name!r} cannot be loaded: {type(e).__name__}: {e}")
        return None
    if not ok:
        c.fail(f"{path}.name", f"unknown workload {name!r} (known: {', '.join(known_workloads())})")
        return None
    check = getattr(importlib.import_module(f"guestemu.workloads.{name}"), "check_params", None)
    if check is not None:
        try:
            check(params)  # what the guest will do: reject bad params now
        except (ConfigError, ValueError, TypeError) as e:
            c.fail(path, str(e))
            return None
    return WorkloadSpec(name, params)


def _parse_vm(c: _Checker, raw: dict[str, Any], path: str) -> _Vm:
    c.keys(raw, VM_KEYS, path, TOP_KEYS - VM_KEYS, "vm")
    name = c.want_name(raw, path)
    memory = c.want_int(
        raw.get("memory_mib", DEFAULT_MEMORY_MIB), f"{path}.memory_mib", 1, MAX_MEMORY_MIB
    )
    gsis = c.want_int(raw.get("gsis", DEFAULT_GSIS), f"{path}.gsis", 1, MAX_GSIS)
    workload = None
    if "workload" in raw:
        workload = _parse_workload(c, raw["workload"], f"{path}.workload")
    devices: list[_Device] = []
    seen: dict[str, str] = {}
    raw_devices = c.want_tables(raw.get("device", []), f"{path}.device", "vm.device")
    if len(raw_devices) > MAX_FUNCTIONS:
        c.fail(
            f"{path}.device",
            f"at most {MAX_FUNCTIONS} devices per VM (PCI functions), got {len(raw_devices)}",
        )
    for j, d in enumerate(raw_devices):
        dev = _parse_device(c, d, f"{path}.device[{j}]")
        if dev is None:
            continue
        if dev.name in seen:
            c.fail(
                f"{dev.path}.name", f"duplicate device name {dev.name!r} (also {seen[dev.name]})"
            )
            continue
        seen[dev.name] = dev.path
        devices.append(dev)
    cpus = c.want_cpus(raw["cpus"], f"{path}.cpus") if "cpus" in raw else ()
    return _Vm(path, name, memory or DEFAULT_MEMORY_MIB, gsis, workload, devices, cpus)


def _parse_switches(c: _Checker, raw: object, vms: dict[str, _Vm]) -> list[SwitchSpec]:
    switches: list[SwitchSpec] = []
    names: dict[str, str] = {}
    taken: dict[tuple[str, str], str] = {}  # port -> the switch that has it
    for i, s in enumerate(c.want_tables(raw, "switch", "switch")):
        path = f"switch[{i}]"
        c.keys(s, SWITCH_KEYS, path)
        name = c.want_name(s, path)
        if name is not None and name in names:
            c.fail(f"{path}.name", f"duplicate switch name {name!r} (also {names[name]})")
            name = None
        if name is not None:
            names[name] = path
        model = c.want_str(s.get("model", DEFAULT_SWITCH_MODEL), f"{path}.model")
        if model is not None and not _model_ok(c, model, f"{path}.model"):
            model = None
        elif model is not None and not hasattr(_model_module(model), "make_group"):
            c.fail(
                f"{path}.model", f"model {model!r} cannot serve a switch (it defines no make_group)"
            )
            model = None
        raw_ports = s.get("ports")
        if raw_ports is None:
            c.fail(f"{path}.ports", "missing (which vm/device pairs does it connect?)")
            continue
        if not isinstance(raw_ports, list) or not raw_ports:
            c.fail(
                f"{path}.ports",
                f'must be a non-empty array of "vm/device" strings, '
                f"got {_kind(raw_ports)} {raw_ports!r}",
            )
            continue
        ports: list[str] = []
        for k, p in enumerate(raw_ports):
            ppath = f"{path}.ports[{k}]"
            text = c.want_str(p, ppath)
            if text is None:
                continue
            vm_name, sep, dev_name = text.partition("/")
            if not sep or not vm_name or not dev_name:
                c.fail(ppath, f'{text!r} is not of the form "vm/device"')
                continue
            vm = vms.get(vm_name)
            if vm is None:
                c.fail(ppath, f"no VM named {vm_name!r} (VMs: {', '.join(sorted(vms))})")
                continue
            dev = next((d for d in vm.devices if d.name == dev_name), None)
            if dev is None:
                c.fail(
                    ppath,
                    f"VM {vm_name!r} has no device {dev_name!r} "
                    f"(devices: {', '.join(d.name for d in vm.devices) or 'none'})",
                )
                continue
            if (vm_name, dev_name) in taken:
                c.fail(ppath, f"{text!r} is already a port of {taken[vm_name, dev_name]}")
                continue
            if model is not None and dev.model is not None and dev.model != model:
                c.fail(
                    ppath,
                    f"{text!r} is a {dev.model!r} device; switch {name!r} serves {model!r} devices",
                )
                continue
            if "port" in dev.params:
                c.fail(f"{dev.path}.params.port", f"assigned by switch {name!r}; remove it")
                continue
            dev.params["port"] = len(ports)  # as the VMM numbers them: the index
            taken[vm_name, dev_name] = f"switch {name!r}"
            ports.append(text)
        if name is not None and model is not None:
            switches.append(SwitchSpec(name=name, ports=tuple(ports), model=model))
    return switches


def _model_ok(c: _Checker, model: str, path: str) -> bool:
    try:
        module = _model_module(model)
    except Exception as e:  # a broken model module is a problem of this topology
        c.fail(path, f"model {model!r} cannot be loaded: {type(e).__name__}: {e}")
        return False
    if module is None:
        c.fail(path, f"unknown model {model!r} (known: {', '.join(known_models())})")
        return False
    return True


def _check_device(
    c: _Checker, vm: _Vm, dev: _Device, on_switch: set[tuple[str, ...]], base: Path
) -> int:
    """Validate a device against its model; return its MSI vectors (0 if unknown)."""
    if dev.model is None or not _model_ok(c, dev.model, f"{dev.path}.model"):
        return 0
    dev.module = module = _model_module(dev.model)
    assert module is not None  # _model_ok said so
    _resolve_paths(c, dev, base)
    if (
        hasattr(module, "make_group")
        and vm.name is not None
        and (vm.name, dev.name) not in on_switch
    ):
        c.fail(
            dev.path,
            f"a {dev.model!r} device must be a port of a [[switch]] "
            f'(none lists "{vm.name}/{dev.name}")',
        )
        return int(module.VECTORS)
    for check_name in ("check_params", "device_config"):  # what the device and the VMM do
        check = getattr(module, check_name, None)
        if check is None:
            continue
        try:
            check(dev.params)  # reject bad params now
        except (ConfigError, ValueError, TypeError, KeyError, OSError) as e:
            c.fail(f"{dev.path}.params", str(e))
            break
    return int(module.VECTORS)


def parse(data: dict[str, Any], base_dir: Path | str = ".", source: str = "<topology>") -> Topology:
    """Validate parsed TOML ``data``; relative paths resolve against ``base_dir``."""
    c = _Checker()
    base = Path(base_dir).absolute()
    c.keys(data, TOP_KEYS, "")
    policy = Policy.REFCOUNT
    if "policy" in data and (p := c.want_str(data["policy"], "policy")) is not None:
        if p in ("hup", "refcount"):
            policy = Policy[p.upper()]
        else:
            c.fail("policy", f'must be "hup" or "refcount", got {p!r}')
    if "vm" not in data:
        c.fail("vm", "missing: a topology needs at least one [[vm]]")
    raw_vms = c.want_tables(data.get("vm", []), "vm", "vm")
    if "vm" in data and isinstance(data["vm"], list) and not data["vm"]:
        c.fail("vm", "empty: a topology needs at least one [[vm]]")
    vms: list[_Vm] = []
    by_name: dict[str, _Vm] = {}
    for i, raw in enumerate(raw_vms):
        vm = _parse_vm(c, raw, f"vm[{i}]")
        vms.append(vm)
        if vm.name is None:
            continue
        if vm.name in by_name:
            c.fail(
                f"{vm.path}.name", f"duplicate VM name {vm.name!r} (also {by_name[vm.name].path})"
            )
        else:
            by_name[vm.name] = vm
    switches = _parse_switches(c, data.get("switch", []), by_name)
    on_switch = {tuple(port.split("/", 1)) for s in switches for port in s.ports}
    for vm in vms:
        vectors = sum(_check_device(c, vm, d, on_switch, base) for d in vm.devices)
        # The guest's boot gives every MSI vector its own gsi, from 1 up (0 stays unused).
        if vm.gsis is not None and vectors >= vm.gsis:
            c.fail(
                f"{vm.path}.gsis",
                f"{vm.gsis} gsis cannot serve the {vectors} MSI "
                f"vectors of its devices (gsi 0 is unused: need at least {vectors + 1})",
            )
    if c.problems:
        raise TopologyError(source, c.problems)
    specs = [
        VmSpec(
            name=str(vm.name),
            memory=vm.memory_mib << 20,
            ngsi=int(vm.gsis or 0),
            devices=tuple(_device_spec(d) for d in vm.devices),
            workload=vm.workload.argv() if vm.workload else (),
            cpus=vm.cpus,
        )
        for vm in vms
    ]
    return Topology(specs, policy, switches, {str(vm.name): vm.workload for vm in vms}, None)


def _device_spec(dev: _Device) -> DeviceSpec:
    if dev.queue_size_max is None:
        return DeviceSpec(
            model=str(dev.model),
            name=dev.name,
            params=dev.params,
            restarts=dev.restarts,
            cpus=dev.cpus,
        )
    return DeviceSpec(
        model=str(dev.model),
        name=dev.name,
        params=dev.params,
        queue_size_max=dev.queue_size_max,
        restarts=dev.restarts,
        cpus=dev.cpus,
    )


def loads(text: str, base_dir: Path | str = ".", source: str = "<topology>") -> Topology:
    """Parse and validate TOML ``text``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TopologyError(source, [f"TOML syntax error: {e}"]) from None
    return parse(data, base_dir, source)


def load(path: Path | str) -> Topology:
    """Read, parse and validate the topology file at ``path``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TopologyError(str(p), [f"cannot read: {e}"]) from None
    return dataclasses.replace(loads(text, p.parent, str(p)), source=p)


def image_paths(topology: Topology) -> list[Path]:
    """The disk images the topology's devices use (params a model lists in its
    ``IMAGE_PARAMS``), in file order -- what ``vbusemu run`` locks for the run."""
    out: list[Path] = []
    for vm in topology.vms:
        for dev in vm.devices:
            module = _model_module(dev.model)
            for key in getattr(module, "IMAGE_PARAMS", ()):
                value = dev.params.get(key)
                if isinstance(value, str) and value:
                    out.append(Path(value))
    return out


def to_vmm_spec(topology: Topology) -> dict[str, Any]:
    """The JSON-able document ``python -m hostemu.vmm --spec`` takes:
    ``{"vms": [...], "switches": [...]}`` (see :func:`hostemu.vmm.parse_spec`)."""
    return {
        "vms": [
            {
                "name": vm.name,
                "memory": vm.memory,
                "ngsi": vm.ngsi,
                "devices": [
                    {
                        "model": d.model,
                        "name": d.name,
                        "params": d.params,
                        "queue_size_max": d.queue_size_max,
                        "restarts": d.restarts,
                        "cpus": list(d.cpus),
                    }
                    for d in vm.devices
                ],
                "workload": list(vm.workload),
                "cpus": list(vm.cpus),
            }
            for vm in topology.vms
        ],
        "switches": [
            {"name": s.name, "model": s.model, "ports": list(s.ports)} for s in topology.switches
        ],
    }
