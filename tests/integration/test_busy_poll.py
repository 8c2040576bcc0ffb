"""The echo device's busy polling (``busy_poll_us``, vhost's busyloop) through real
processes: stop-and-wait frames with the guest halt-polling and the device busy-polling
its TX ring, every frame verified; the device still answers its control pipe and exits
cleanly while spinning. Off by default. No timing is asserted."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hostemu.devices.echo import make_model
from shared.errors import ConfigError
from tests.conftest import BrokerHandle
from tests.integration.test_dataplane import run_vmm

pytestmark = pytest.mark.timeout(180)


def polling_vm(count: int, device: dict[str, Any], halt_poll_ns: int) -> dict[str, Any]:
    params = {"count": count, "size": 64, "batch": 1, "window": 1}
    return {
        "name": "vm0",
        "devices": [{"model": "echo", "name": "echo0", "params": device}],
        "workload": [
            "--workload",
            "echo",
            "--params",
            json.dumps(params),
            "--halt-poll-ns",
            str(halt_poll_ns),
        ],
    }


def test_round_trips_with_the_device_busy_polling(broker: BrokerHandle) -> None:
    result = run_vmm(broker, [polling_vm(400, {"busy_poll_us": 2000}, 2_000_000)])
    assert result["returncode"] == 0, result  # the device quit cleanly while polling
    r = result["results"]["vm0"]
    assert r["ok"] and r["frames"] == 400 and r["rtt_samples"] == 400, r
    dev = result["stats"]["vm0"]["devices"]["echo0"]
    assert dev["model"]["echoed"] == 400 and dev["model"]["backlog"] == 0
    assert dev["counters"]["busy_polls"] > 0
    # requests the busy loop found plus those a kick announced cover every pass
    assert dev["counters"].get("busy_poll_hits", 0) + dev["counters"].get("kicks", 0) > 0
    assert not broker.connect().state()["objects"]


def test_busy_polling_is_off_by_default(broker: BrokerHandle) -> None:
    result = run_vmm(broker, [polling_vm(50, {}, 0)])
    assert result["returncode"] == 0, result
    assert result["results"]["vm0"]["ok"]
    counters = result["stats"]["vm0"]["devices"]["echo0"]["counters"]
    assert "busy_polls" not in counters and counters["kicks"] > 0


@pytest.mark.parametrize(
    "params",
    [
        {"busy_poll_us": -1},
        {"busy_poll_us": True},
        {"busy_poll_us": 10**7},
        {"busy_poll_us": "5"},
        {"other": 1},
    ],
)
def test_bad_busy_poll_options_are_refused(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        make_model(params)
