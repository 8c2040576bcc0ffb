"""The ``vbusemu`` command's own arguments: a bad number, an unknown option or a bad
configuration value is a usage error (exit 2, the subcommand named) before anything starts;
a reader that goes away early ends the output quietly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hostemu.cli import main
from tests import timing


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--timeout", "-1"],
        ["run", "--timeout", "0"],
        ["run", "--timeout", "nan"],
        ["run", "--timeout", "soon"],
        ["demo", "--signals", "-5"],
        ["soak", "--seconds", "-1"],
        ["soak", "--fault-every", "0"],
        ["broker", "--ack-timeout", "0"],
        ["run", "--timout", "5"],
        ["run", "a.toml", "extra"],
        ["conform", "--scenerio", "x"],
    ],
)
def test_bad_arguments_are_usage_errors_of_the_subcommand(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"vbusemu {argv[0]}: error:" in err
    assert "Traceback" not in err


def test_a_bad_configuration_value_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VBUSEMU_JIT", "2")
    assert main(["run"]) == 2
    assert "VBUSEMU_JIT='2'" in capsys.readouterr().err


@pytest.mark.timeout(timing.scaled(30))
def test_a_reader_that_leaves_early_gets_no_traceback() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hostemu.cli", "conform", "--list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    with proc.stderr:
        proc.stdout.close()  # before it writes (it is still starting Python): its write fails
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=timing.scaled(20)) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
