"""The bench's pure reporting rules, fed made-up figures: spreads and the ``noisy`` mark,
the path of every row, target labels, the load warning, the table. Nothing is measured."""

from __future__ import annotations

import json

import pytest

from hostemu.bench import procmem, report
from hostemu.bench.report import KERNELS, REFERENCE, Row, row_from_reps

MACHINE = {
    "cores": 2,
    "usable_cores": 2,
    "cpu_model": "Test CPU",
    "kernel": "6.0",
    "python": "3.11",
    "numpy": "2.0",
}


def rows_for_targets(pipe256: float = 100.0, vbus256: float = 1230.0) -> list[Row]:
    """One row (three repetitions) for each figure the targets read."""

    def r(
        workload: str,
        params: dict,
        metric: str,
        value: float,
        unit: str,
        path: str | None = KERNELS,
        spread: float = 0.0,
    ) -> Row:
        return row_from_reps(
            workload,
            params,
            metric,
            [value * (1 - spread / 2), value, value * (1 + spread / 2)],
            unit,
            path=path,
        )

    rows = []
    for batch, vbus in ((1, 150.0), (16, 400.0), (256, vbus256)):
        pipe = pipe256 if batch == 256 else 300.0
        rows.append(
            r(
                "baseline",
                {"kind": "pipe", "payload": 64, "batch": batch},
                "msgs/s",
                pipe,
                "msgs/s",
                path=None,
            )
        )
        rows.append(
            r(
                "small-messages",
                {"payload": 64, "batch": batch, "mode": "event-idx"},
                "msgs/s",
                vbus,
                "msgs/s",
            )
        )
        # the reference path's row must not be taken for the kernels' one
        rows.append(
            r(
                "small-messages",
                {"payload": 64, "batch": batch, "mode": "event-idx"},
                "msgs/s",
                vbus / 100,
                "msgs/s",
                path=REFERENCE,
            )
        )
    rows.append(
        r(
            "baseline",
            {"kind": "eventfd-pingpong", "placement": "cross-cpu"},
            "rtt_p50",
            50.0,
            "us",
            path=None,
        )
    )
    rows.append(
        r("round-trip", {"mode": "polling", "placement": "cross-cpu"}, "rtt_p50", 40.0, "us")
    )
    rows.append(
        r(
            "round-trip",
            {"mode": "sleeping", "placement": "cross-cpu"},
            "rtt_p50",
            60.0,
            "us",
            spread=0.5,
        )
    )
    rows.append(
        r("baseline", {"kind": "numpy-copy", "size": 1 << 20}, "bytes/s", 20e9, "B/s", path=None)
    )
    rows.append(r("bulk", {"size": 1 << 20}, "bytes/s", 9e9, "B/s"))
    rows.append(r("control-plane", {"live_bindings": 10}, "latency_p50", 100.0, "us", path=None))
    rows.append(r("control-plane", {"live_bindings": 10000}, "latency_p50", 101.0, "us", path=None))
    rows.append(r("scale", {"vms": 1}, "msgs/s", 100.0, "msgs/s"))
    rows.append(r("scale", {"vms": 4}, "msgs/s", 200.0, "msgs/s"))
    return rows


def test_spread_marks_a_figure_noisy_above_a_quarter() -> None:
    calm = row_from_reps("x", {}, "msgs/s", [100.0, 110.0, 120.0], "msgs/s", path=KERNELS)
    assert calm.value == 110.0 and calm.min == 100.0 and calm.max == 120.0
    assert calm.spread == pytest.approx(20 / 110) and not calm.noisy
    # the quick run that once reported a 14x "scale" artefact: one repetition far off
    wild = row_from_reps("x", {}, "msgs/s", [100.0, 1400.0, 105.0], "msgs/s", path=KERNELS)
    assert wild.value == 105.0 and wild.noisy
    edge = row_from_reps("x", {}, "us", [80.0, 100.0, 105.0], "us")
    assert edge.spread == pytest.approx(0.25) and not edge.noisy  # "exceeds" 25 %


def test_one_repetition_has_no_spread_and_is_never_marked() -> None:
    one = row_from_reps("x", {}, "s", [3.0], "s", path=KERNELS)
    assert one.spread is None and not one.noisy
    assert report.fmt_spread(one) == "1 rep"
    zero = row_from_reps("x", {}, "per msg", [0.0, 0.0, 0.1], "per msg")
    assert zero.spread is None and not zero.noisy  # a zero median: no relative spread


def test_noisy_marking_reaches_the_table_summary_and_results() -> None:
    rows = [
        row_from_reps("scale", {"vms": 4}, "msgs/s", [1.0, 14.0, 1.1], "msgs/s", path=KERNELS),
        row_from_reps("scale", {"vms": 1}, "msgs/s", [1.0, 1.05, 1.1], "msgs/s", path=KERNELS),
    ]
    cells = report.table_rows(rows)
    assert cells[0][report.COLUMNS.index("spread")].endswith("noisy")
    assert "noisy" not in cells[1][report.COLUMNS.index("spread")]
    s = report.summary(rows, [], MACHINE, mode="quick", load_before=[0.1, 0, 0])
    assert [f["case"] for f in s["noisy"]] == ["4 VMs"]
    assert all(f["path"] == KERNELS for f in s["figures"])
    assert rows[0].to_json(MACHINE)["noisy"] is True


def test_every_row_says_its_path() -> None:
    row = row_from_reps(
        "small-messages", {"batch": 1}, "msgs/s", [1.0, 1.0, 1.0], "msgs/s", path=REFERENCE
    )
    out = row.to_json(MACHINE)
    assert out["path"] == "reference" and out["machine"] == MACHINE
    assert json.loads(json.dumps(out))["path"] == "reference"
    assert report.table_rows([row])[0][report.COLUMNS.index("path")] == "reference"
    base = row_from_reps("baseline", {"kind": "pipe"}, "msgs/s", [1.0], "msgs/s")
    assert base.to_json(MACHINE)["path"] is None  # no ring code runs in a baseline
    assert report.table_rows([base])[0][report.COLUMNS.index("path")] == "-"


def test_target_labels_read_as_the_target_is_written() -> None:
    assert (
        report.target_label("cross-CPU round trip, sleeping <= 1.5x eventfd ping-pong", 1.2, True)
        == "cross-CPU round trip, sleeping <= 1.5x eventfd ping-pong: 1.2x — met"
    )
    assert (
        report.target_label("64 B batch 256 >= 40x Pipe", 12.3, False)
        == "64 B batch 256 >= 40x Pipe: 12.3x — missed"
    )
    assert report.target_label("t", None, False) == "t: not measured — missed"
    assert report.target_label("t", 0.8, True, noisy=True) == "t: 0.8x — met (noisy)"


def test_targets_are_evaluated_on_the_runs_path_and_as_written() -> None:
    targets = {t["target"]: t for t in report.evaluate(report.TARGETS, rows_for_targets(), KERNELS)}
    assert len(targets) == 8
    b256 = targets["64 B batch 256 >= 40x Pipe"]
    assert b256["value"] == pytest.approx(12.3) and not b256["met"]
    assert b256["label"] == "64 B batch 256 >= 40x Pipe: 12.3x — missed"
    assert b256["why_missed"] and b256["path"] == KERNELS
    poll = targets["cross-CPU round trip, polling <= 0.5x eventfd ping-pong"]
    assert poll["value"] == pytest.approx(0.8) and not poll["met"]
    sleep = targets["cross-CPU round trip, sleeping <= 1.5x eventfd ping-pong"]
    assert sleep["value"] == pytest.approx(1.2) and sleep["met"] and sleep["noisy"]
    assert sleep["label"].endswith("1.2x — met (noisy)") and sleep["why_missed"] is None
    bulk = targets["bulk 1 MiB >= 0.8x the two-copy bound (numpy copy / 2)"]
    assert bulk["value"] == pytest.approx(0.9) and bulk["met"]  # 9 GB/s vs 20 / 2
    assert targets["control plane: latency @10,000 bindings <= 1.5x @10"]["met"]
    assert targets["scale: 4 VMs >= 0.8x 1 VM"]["value"] == pytest.approx(2.0)
    assert targets["64 B batch 1 >= 2x Pipe"]["value"] == pytest.approx(0.5)
    # a run on the reference path reads the reference rows
    ref = {t["target"]: t for t in report.evaluate(report.TARGETS, rows_for_targets(), REFERENCE)}
    assert ref["64 B batch 256 >= 40x Pipe"]["value"] == pytest.approx(0.123)
    # a figure that was not measured is a plain miss
    missing = report.evaluate(report.TARGETS, [], KERNELS)
    assert all(not t["met"] and t["value"] is None for t in missing)


def test_load_warning_above_half_a_cpu_at_start() -> None:
    assert report.load_warning([0.4, 2.0, 2.0]) is None
    warning = report.load_warning([3.28, 3.2, 3.4])
    assert warning is not None and warning.startswith("WARNING") and "3.28" in warning
    header = report.header_lines(MACHINE, "quick", 3, KERNELS, [3.28, 3.2, 3.4], [3.5, 3.3, 3.4])
    assert warning in header
    assert any("3.28/3.20/3.40 before, 3.50/3.30/3.40 after" in h for h in header)
    quiet = report.header_lines(MACHINE, "full", 3, KERNELS, [0.1, 0.1, 0.1], None)
    assert not any(h.startswith("WARNING") for h in quiet)
    assert report.summary([], [], MACHINE, load_before=[0.9, 0, 0])["load_warning"]


def test_console_is_one_table_with_targets_below() -> None:
    rows = rows_for_targets()
    rows.append(
        row_from_reps(
            "small-messages",
            {"payload": 64, "batch": 256, "mode": "event-idx"},
            "doorbells/msg",
            [0.001] * 3,
            "per msg",
            path=KERNELS,
        )
    )
    targets = report.evaluate(report.TARGETS, rows, KERNELS)
    text = report.console(
        rows,
        targets,
        report.header_lines(MACHINE, "quick", 3, KERNELS, [0.1, 0.1, 0.1], [0.2, 0.2, 0.2]),
    )
    lines = text.splitlines()
    assert not any(line.lstrip().startswith("{") for line in lines)  # no JSON lines
    head = next(i for i, line in enumerate(lines) if line.startswith("workload"))
    assert set(lines[head + 1]) <= {"-", " "}
    assert "64 B, batch 256, event-idx" in text
    assert "0.001 doorbells/msg" in text  # folded into its throughput row
    assert "64 B batch 256 >= 40x Pipe: 12.3x — missed" in text
    md = report.markdown(rows, targets, ["h"])
    assert "| workload | case | path |" in md and "## Targets" in md


def test_formats() -> None:
    assert report.fmt_size(64) == "64 B"
    assert report.fmt_size(64 << 10) == "64 KiB"
    assert report.fmt_size(1 << 20) == "1 MiB"
    assert report.fmt_value(2_491_179.6, "msgs/s") == "2.49 Mmsg/s"
    assert report.fmt_value(9.95e9, "B/s") == "9.95 GB/s"
    assert report.fmt_value(43.3, "us") == "43.3 us"
    assert (
        report.fmt_case({"payload": 64, "batch": 1, "mode": "event-idx", "window": 256})
        == "64 B, batch 1, event-idx, window 256"
    )


def test_procmem_kinds_and_steady_readings() -> None:
    py = "/usr/bin/python3"
    assert procmem.kind_of([py, "-m", "hostemu.cli", "run", "x.toml"]) == "launcher"
    assert procmem.kind_of([py, "-m", "hostemu.broker", "--socket", "s"]) == "broker"
    assert procmem.kind_of([py, "-m", "hostemu.vmm"]) == "vmm"
    assert procmem.kind_of([py, "-m", "guestemu.guest", "a"]) == "guest"
    assert procmem.kind_of([py, "-m", "hostemu.devices", "blk", "--params", "{}"]) == "blk device"
    assert procmem.kind_of([py, "-c", "pass"]) is None
    assert procmem.parse_kib("Name:\tx\nVmRSS:\t  1234 kB\n", "VmRSS") == 1234
    R = procmem.Reading
    boot = {1: R("broker", 10, 5), 2: R("guest", 50, 30)}
    full1 = {
        1: R("broker", 11, 5),
        2: R("guest", 60, 40),
        3: R("echo device", 70, 45),
        9: R("warm", 100, 100),
    }
    full2 = {1: R("broker", 11, 6), 2: R("guest", 65, 38), 3: R("echo device", 68, 44)}
    steady = procmem.steady([boot, full1, full2], {"broker": 1, "guest": 1, "echo device": 1})
    assert steady == {1: R("broker", 11, 6), 2: R("guest", 65, 40), 3: R("echo device", 70, 45)}
    assert procmem.steady([boot], {"guest": 1, "echo device": 1}) == {}
