"""Topology files: every validation error names its field; examples become VMM specs.

No processes: parsing only. Models that only tests need are fake modules registered in
``sys.modules`` (the topology imports models by name, exactly as the VMM does).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from hostemu import topology
from hostemu.topology import TopologyError, load, loads, to_vmm_spec
from hostemu.vmm import DeviceSpec, SwitchSpec, VmSpec, parse_spec
from shared.errors import ConfigError
from shared.wire import Policy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _fake(
    name: str, *, vectors: int = 1, group: bool = False, path_params: tuple[str, ...] = ()
) -> ModuleType:
    module = ModuleType(f"hostemu.devices.{name}")

    def device_config(params: dict[str, Any]) -> bytes:
        if "bad" in params:
            raise ConfigError(f"{name}: option 'bad' is not allowed")
        return b""

    module.__dict__.update(
        DEVICE_ID=0x7E,
        QUEUES=1,
        VECTORS=vectors,
        make_model=lambda params: None,
        device_config=device_config,
        PATH_PARAMS=path_params,
    )
    if group:
        module.__dict__["make_group"] = lambda params, count: [None] * count
    return module


@pytest.fixture(autouse=True)
def fake_models(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``fakedev`` (3 vectors, a path option ``disk``) and ``fakesw`` (a switch model)."""
    for module in (
        _fake("fakedev", vectors=3, path_params=("disk",)),
        _fake("fakesw", vectors=2, group=True),
    ):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    yield


def problems(text: str) -> str:
    with pytest.raises(TopologyError) as info:
        loads(text)
    assert isinstance(info.value, ConfigError)
    return str(info.value)


VM = '[[vm]]\nname = "a"\n'
CONSOLE = '[[vm.device]]\nname = "c0"\nmodel = "console"\n'
TWO_PORTS = (
    '[[vm]]\nname = "a"\n[[vm.device]]\nname = "net0"\nmodel = "fakesw"\n'
    '[[vm]]\nname = "b"\n[[vm.device]]\nname = "net0"\nmodel = "fakesw"\n'
)


def switch(ports: str, extra: str = "") -> str:
    return f'[[switch]]\nname = "sw0"\nmodel = "fakesw"\nports = {ports}\n{extra}'


# (id, TOML text, substrings the error must contain -- the first names the field)
CASES: list[tuple[str, str, list[str]]] = [
    (
        "unknown-model",
        VM + CONSOLE + '[[vm]]\nname = "b"\n[[vm.device]]\nname = "d"\nmodel = "foo"\n',
        ["vm[1].device[0].model: unknown model 'foo' (known: ", "console", "echo"],
    ),
    (
        "memory-zero",
        VM + "memory_mib = 0\n",
        ["vm[0].memory_mib: must be an integer 1..4096, got integer 0"],
    ),
    ("memory-huge", VM + "memory_mib = 4097\n", ["vm[0].memory_mib: must be an integer 1..4096"]),
    (
        "memory-string",
        VM + 'memory_mib = "16"\n',
        ["vm[0].memory_mib: must be an integer 1..4096, got string '16'"],
    ),
    ("memory-float", VM + "memory_mib = 16.0\n", ["vm[0].memory_mib: must be an integer", "float"]),
    (
        "memory-bool",
        VM + "memory_mib = true\n",
        ["vm[0].memory_mib: must be an integer", "boolean"],
    ),
    ("gsis-range", VM + "gsis = 2000\n", ["vm[0].gsis: must be an integer 1..1024"]),
    (
        "gsis-too-few",
        VM + "gsis = 3\n" + '[[vm.device]]\nname = "d"\nmodel = "fakedev"\n',
        ["vm[0].gsis: 3 gsis cannot serve the 3 MSI vectors", "need at least 4"],
    ),
    ("duplicate-vm", VM + VM, ["vm[1].name: duplicate VM name 'a' (also vm[0])"]),
    (
        "duplicate-device",
        VM + CONSOLE + CONSOLE,
        ["vm[0].device[1].name: duplicate device name 'c0' (also vm[0].device[0])"],
    ),
    ("bad-name", '[[vm]]\nname = "a/b"\n', ["vm[0].name: 'a/b' is not a valid name"]),
    ("missing-name", "[[vm]]\nmemory_mib = 4\n", ["vm[0].name: missing"]),
    ("missing-model", VM + '[[vm.device]]\nname = "d"\n', ["vm[0].device[0].model: missing"]),
    ("name-type", "[[vm]]\nname = 5\n", ["vm[0].name: must be a string, got integer 5"]),
    ("no-vm", 'policy = "hup"\n', ["vm: missing"]),
    ("empty-vm", "vm = []\n", ["vm: empty"]),
    ("vm-not-tables", "vm = 5\n", ["vm: must be an array of tables ([[vm]]), got integer"]),
    ("vm-table-not-array", '[vm]\nname = "a"\n', ["vm: must be an array of tables"]),
    ("device-not-tables", VM + 'device = ["x"]\n', ["vm[0].device: must be an array of tables"]),
    (
        "too-many-devices",
        VM + "".join(f'[[vm.device]]\nname = "c{i}"\nmodel = "console"\n' for i in range(33)),
        ["vm[0].device: at most 32 devices per VM"],
    ),
    (
        "policy-value",
        'policy = "sometimes"\n' + VM,
        ['policy: must be "hup" or "refcount", got \'sometimes\''],
    ),
    ("policy-type", "policy = 1\n" + VM, ["policy: must be a string"]),
    (
        "unknown-top-key",
        'polciy = "hup"\n' + VM,
        ["polciy: unknown key (did you mean 'policy'?); allowed: policy, switch, vm"],
    ),
    (
        "unknown-vm-key",
        VM + "memroy_mib = 4\n",
        ["vm[0].memroy_mib: unknown key (did you mean 'memory_mib'?)"],
    ),
    (
        "unknown-device-key",
        VM + '[[vm.device]]\nname = "c0"\nmodle = "console"\n',
        [
            "vm[0].device[0].modle: unknown key (did you mean 'model'?)",
            "vm[0].device[0].model: missing",
        ],
    ),
    (
        "unknown-switch-key",
        TWO_PORTS + switch('["a/net0", "b/net0"]', "prots = []\n"),
        ["switch[0].prots: unknown key (did you mean 'ports'?)"],
    ),
    (
        "vm-key-after-device",
        VM + CONSOLE + 'workload = "console"\n',
        [
            "vm[0].device[0].workload: belongs to the enclosing table: keys written after "
            "[[vm.device]] go into it, so move 'workload' above it"
        ],
    ),
    (
        "top-key-after-vm",
        VM + 'policy = "hup"\n',
        ["vm[0].policy: belongs to the enclosing table", "after [[vm]]"],
    ),
    (
        "params-type",
        VM + '[[vm.device]]\nname = "c0"\nmodel = "console"\nparams = "x"\n',
        ["vm[0].device[0].params: must be a table, got string"],
    ),
    (
        "params-rejected",
        VM + '[[vm.device]]\nname = "d"\nmodel = "fakedev"\nparams = { bad = 1 }\n',
        ["vm[0].device[0].params: fakedev: option 'bad' is not allowed"],
    ),
    (
        "params-date",
        VM + '[[vm.device]]\nname = "d"\nmodel = "fakedev"\nparams = { when = 1979-05-27 }\n',
        ["vm[0].device[0].params.when: a TOML date cannot be passed"],
    ),
    (
        "queue-size",
        VM + CONSOLE + "queue_size_max = 100\n",
        ["vm[0].device[0].queue_size_max: must be a power of two 1..32768, got integer 100"],
    ),
    (
        "workload-unknown",
        VM + 'workload = { name = "nope" }\n',
        ["vm[0].workload.name: unknown workload 'nope' (known: ", "console", "echo"],
    ),
    ("workload-no-name", VM + "workload = { count = 1 }\n", ["vm[0].workload.name: missing"]),
    (
        "workload-param-role",
        VM + 'workload = { name = "net", role = "sned", peer = 1 }\n',
        ["vm[0].workload: role must be one of send, reflect, flood, not 'sned'"],
    ),
    (
        "workload-main-net-role",
        VM + 'workload = { name = "main", net = { role = "sned", peer = 1 } }\n',
        ["vm[0].workload: net.role must be one of send, reflect, flood, not 'sned'"],
    ),
    (
        "workload-main-net-type",
        VM + 'workload = { name = "main", net = 3 }\n',
        ["vm[0].workload: net must be a table, not 3"],
    ),
    (
        "workload-param-count",
        VM + 'workload = { name = "echo", count = -5 }\n',
        ["vm[0].workload: count must be an integer >= 0, not -5"],
    ),
    (
        "workload-param-missing-peer",
        VM + 'workload = { name = "net" }\n',
        ["vm[0].workload: peer is missing (role 'send' needs a port id)"],
    ),
    (
        "device-params-none-taken",
        VM + CONSOLE + "params = { foo = 1 }\n",
        ["vm[0].device[0].params: console takes no options, got ['foo']"],
    ),
    ("workload-type", VM + "workload = 3\n", ["vm[0].workload: must be a table, got integer"]),
    (
        "workload-date",
        VM + 'workload = { name = "console", at = 12:00:00 }\n',
        ["vm[0].workload.at: a TOML time cannot be passed"],
    ),
    (
        "port-missing-vm",
        TWO_PORTS + switch('["a/net0", "zz/net0"]'),
        ["switch[0].ports[1]: no VM named 'zz' (VMs: a, b)"],
    ),
    (
        "port-missing-device",
        TWO_PORTS + switch('["a/net0", "b/net9"]'),
        ["switch[0].ports[1]: VM 'b' has no device 'net9' (devices: net0)"],
    ),
    (
        "port-form",
        TWO_PORTS + switch('["a/net0", "b-net0"]'),
        ["switch[0].ports[1]: 'b-net0' is not of the form \"vm/device\""],
    ),
    (
        "port-twice",
        TWO_PORTS + switch('["a/net0", "b/net0", "a/net0"]'),
        ["switch[0].ports[2]: 'a/net0' is already a port of switch 'sw0'"],
    ),
    (
        "port-type",
        TWO_PORTS + switch('["a/net0", 7]'),
        ["switch[0].ports[1]: must be a string, got integer 7"],
    ),
    ("ports-type", TWO_PORTS + switch('"a/net0"'), ["switch[0].ports: must be a non-empty array"]),
    (
        "ports-missing",
        TWO_PORTS + '[[switch]]\nname = "sw0"\nmodel = "fakesw"\n',
        ["switch[0].ports: missing"],
    ),
    (
        "port-wrong-model",
        TWO_PORTS + VM.replace('"a"', '"c"') + CONSOLE + switch('["a/net0", "b/net0", "c/c0"]'),
        ["switch[0].ports[2]: 'c/c0' is a 'console' device; switch 'sw0' serves 'fakesw'"],
    ),
    (
        "port-param-by-hand",
        TWO_PORTS.replace('model = "fakesw"\n', 'model = "fakesw"\nparams = { port = 3 }\n', 1)
        + switch('["a/net0", "b/net0"]'),
        ["vm[0].device[0].params.port: assigned by switch 'sw0'; remove it"],
    ),
    (
        "switch-model-not-group",
        TWO_PORTS + '[[switch]]\nname = "sw0"\nmodel = "console"\nports = ["a/net0"]\n',
        ["switch[0].model: model 'console' cannot serve a switch"],
    ),
    (
        "switch-model-unknown",
        TWO_PORTS + '[[switch]]\nname = "sw0"\nmodel = "nosuch"\nports = ["a/net0"]\n',
        ["switch[0].model: unknown model 'nosuch'"],
    ),
    (
        "duplicate-switch",
        TWO_PORTS + switch('["a/net0"]') + switch('["b/net0"]'),
        ["switch[1].name: duplicate switch name 'sw0' (also switch[0])"],
    ),
    (
        "unswitched-port",
        TWO_PORTS + switch('["a/net0"]'),
        [
            "vm[1].device[0]: a 'fakesw' device must be a port of a [[switch]] "
            '(none lists "b/net0")'
        ],
    ),
    ("restarts-negative", VM + CONSOLE + "restarts = -1\n", ["vm[0].device[0].restarts: must be"]),
    (
        "cpus-unusable",
        VM + CONSOLE + "cpus = [100000]\n",
        ["vm[0].device[0].cpus: CPUs [100000] are not usable here (usable: ["],
    ),
    (
        "cpus-empty",
        VM + "cpus = []\n" + CONSOLE,
        ["vm[0].cpus: must be a non-empty list of CPU numbers, got array []"],
    ),
    (
        "cpus-type",
        VM + 'cpus = "0"\n' + CONSOLE,
        ["vm[0].cpus: must be a non-empty list of CPU numbers, got string '0'"],
    ),
    ("toml-syntax", VM + "memory_mib = \n", ["TOML syntax error", "line 3"]),
    ("toml-duplicate-key", VM + 'name = "b"\n', ["TOML syntax error", "line 3"]),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_error_names_the_field(text: str, expected: list[str]) -> None:
    message = problems(text)
    for part in expected:
        assert part in message, message


def test_every_problem_is_reported_at_once() -> None:
    message = problems(
        'polciy = "hup"\n[[vm]]\nname = "a"\nmemory_mib = 0\n'
        '[[vm.device]]\nname = "d"\nmodel = "foo"\n'
    )
    assert message.startswith("<topology>: 3 problems:"), message
    for field in ("polciy:", "vm[0].memory_mib:", "vm[0].device[0].model:"):
        assert field in message, message


def test_error_carries_source_and_problem_list(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("[[vm]]\nname = 5\n")
    with pytest.raises(TopologyError) as info:
        load(path)
    assert info.value.source == str(path)
    assert info.value.problems == ["vm[0].name: must be a string, got integer 5"]
    assert str(info.value) == f"{path}: vm[0].name: must be a string, got integer 5"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")


def test_defaults_and_shapes() -> None:
    topo = loads(VM + 'workload = "console"\n' + CONSOLE)
    assert topo.policy is Policy.REFCOUNT and topo.switches == []
    assert topo.vms == [
        VmSpec(
            name="a",
            memory=16 << 20,
            ngsi=32,
            devices=(DeviceSpec("console", "c0"),),
            workload=("--workload", "console", "--params", "{}"),
        )
    ]
    assert topo.workloads["a"] == topology.WorkloadSpec("console", {})


def test_device_restarts_reach_the_vmm_spec() -> None:
    topo = loads(VM + CONSOLE + "restarts = 3\n")
    assert topo.vms[0].devices[0].restarts == 3
    vms, _ = _round_trip(topo)
    assert vms[0].devices[0].restarts == 3


def test_cpus_reach_the_vmm_spec() -> None:
    cpu = min(os.sched_getaffinity(0))
    topo = loads(VM + f"cpus = [{cpu}]\n" + CONSOLE + f"cpus = [{cpu}]\n")
    assert topo.vms[0].cpus == (cpu,) and topo.vms[0].devices[0].cpus == (cpu,)
    vms, _ = _round_trip(topo)
    assert vms[0].cpus == (cpu,) and vms[0].devices[0].cpus == (cpu,)


def test_a_broken_module_is_a_problem_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def import_module(name: str, package: str | None = None) -> ModuleType:
        if name.endswith(".halfdone"):
            raise SyntaxError("invalid syntax (halfdone.py, line 7)")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", import_module)
    message = problems(
        VM + 'workload = "halfdone"\n[[vm.device]]\nname = "d"\nmodel = "halfdone"\n'
    )
    assert "vm[0].workload.name: workload 'halfdone' cannot be loaded: SyntaxError" in message, (
        message
    )
    assert "vm[0].device[0].model: model 'halfdone' cannot be loaded: SyntaxError" in message, (
        message
    )


def test_models_added_later_are_discovered() -> None:
    # the discovery is by module, not by a list in topology.py
    known = topology.known_models()
    assert {"console", "echo"} <= set(known)
    assert "runtime" not in known and "__main__" not in known
    assert {"console", "echo"} <= set(topology.known_workloads())
    assert "frames" not in topology.known_workloads()


def test_relative_paths_resolve_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    path = sub / "topo.toml"
    path.write_text(
        VM + '[[vm.device]]\nname = "d"\nmodel = "fakedev"\n'
        'params = { image = "disks/a.img", log_path = "../a.log", '
        'disk = "d.img", other = "x.img", path = "/abs/b.img" }\n'
    )
    monkeypatch.chdir(tmp_path.parent)  # the working directory must not matter
    params = load(path).vms[0].devices[0].params
    assert params == {
        "image": str(sub / "disks" / "a.img"),
        "log_path": str(tmp_path / "a.log"),
        "disk": str(sub / "d.img"),  # the model's own PATH_PARAMS
        "other": "x.img",  # not a path option: untouched
        "path": "/abs/b.img",
    }


def test_empty_path_is_rejected() -> None:
    message = problems(
        VM + '[[vm.device]]\nname = "d"\nmodel = "fakedev"\nparams = { image = "" }\n'
    )
    assert "vm[0].device[0].params.image: an empty path" in message


def test_switch_ports_get_their_index_as_port_id() -> None:
    topo = loads(TWO_PORTS + switch('["b/net0", "a/net0"]'))
    assert topo.switches == [SwitchSpec(name="sw0", ports=("b/net0", "a/net0"), model="fakesw")]
    ports = {vm.name: vm.devices[0].params["port"] for vm in topo.vms}
    assert ports == {"b": 0, "a": 1}


def _round_trip(topo: topology.Topology) -> tuple[list[VmSpec], list[SwitchSpec]]:
    """What the VMM makes of ``to_vmm_spec`` after a trip through JSON."""
    return parse_spec(json.dumps(to_vmm_spec(topo)))


@pytest.mark.parametrize("name", ["echo", "minimal", "two-vms"])
def test_examples_round_trip_to_vmm_specs(name: str) -> None:
    topo = load(EXAMPLES / f"{name}.toml")
    assert topo.source == EXAMPLES / f"{name}.toml"
    vms, switches = _round_trip(topo)
    assert vms == topo.vms
    assert switches == topo.switches


def test_examples_say_what_they_promise() -> None:
    echo = load(EXAMPLES / "echo.toml")
    assert [d.model for d in echo.vms[0].devices] == ["echo"]
    assert echo.workloads[echo.vms[0].name] is not None
    minimal = load(EXAMPLES / "minimal.toml")
    assert [d.model for d in minimal.vms[0].devices] == ["console"]
    assert minimal.workloads["vm0"] == topology.WorkloadSpec("console", {})
    two = load(EXAMPLES / "two-vms.toml")
    assert [vm.name for vm in two.vms] == ["a", "b"]
    for vm in two.vms:
        assert {d.name: d.model for d in vm.devices} == {
            "net0": "venet",
            "disk0": "blk",
            "console0": "console",
        }
        disk = next(d for d in vm.devices if d.name == "disk0")
        assert Path(disk.params["image"]).parent == EXAMPLES  # resolved against the file
    assert two.switches == [SwitchSpec(name="sw0", ports=("a/net0", "b/net0"), model="venet")]
    assert two.policy is Policy.REFCOUNT
