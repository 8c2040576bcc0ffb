"""What ``vbusemu run [arg]`` runs: the default, a file, or a shipped example by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostemu import run
from hostemu.topology import TopologyError


def test_no_argument_is_the_two_vm_default() -> None:
    assert run.resolve_topology(None).source == run.DEFAULT_TOPOLOGY


@pytest.mark.parametrize("arg", ["echo", "echo.toml", "minimal"])
def test_a_bare_name_is_a_shipped_example(
    arg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no such file here
    topology = run.resolve_topology(arg)
    assert topology.source == run.DEFAULT_TOPOLOGY.parent / f"{Path(arg).stem}.toml"


def test_a_file_is_loaded_from_where_it_is(tmp_path: Path) -> None:
    mine = tmp_path / "echo.toml"
    mine.write_text((run.DEFAULT_TOPOLOGY.parent / "minimal.toml").read_text())
    assert run.resolve_topology(str(mine)).source == mine  # the file, not the example


def test_an_unknown_name_lists_the_examples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TopologyError, match=r"nor a shipped example .*echo, minimal, two-vms"):
        run.resolve_topology("nope")
    with pytest.raises(TopologyError):
        run.resolve_topology("sub/echo.toml")  # a path that does not exist is not a name
