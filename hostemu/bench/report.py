"""The pure half of ``vbusemu bench``: rows, spreads, targets, the table and the summary.

Nothing here measures anything or starts a process, so every rule below is unit-tested
with made-up figures (``tests/unit/test_bench_report.py``):

* a figure is the median of its repetitions, min and max kept; its *spread* is
  ``(max - min) / median``, and a figure whose spread exceeds :data:`NOISY_SPREAD` is
  marked ``noisy`` (in ``results.json``, ``summary.json`` and the table) -- one
  repetition gives no spread and so never a mark (the table says ``1 rep``);
* every row says which data path produced it (:data:`KERNELS` or :data:`REFERENCE`), or
  ``None`` for a figure that runs no ring code (baselines, the control plane);
* a target is written the way it reads -- ``"64 B batch 256 >= 40x Pipe"`` -- and its
  label adds the measured multiple and the verdict: ``"...: 12.3x — missed"``;
* a 1-minute load average above :data:`LOAD_WARN` when the run starts prints a warning
  line in the table.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

KERNELS = "kernels"
REFERENCE = "reference"
NOISY_SPREAD = 0.25
"""A figure whose (max - min) / median exceeds this is marked ``noisy``."""
LOAD_WARN = 0.5
"""A 1-minute load average above this at the start prints a warning line."""
LOWER_IS_BETTER = ("us", "s", "MiB")


@dataclass
class Row:
    workload: str
    params: dict[str, Any]
    metric: str
    value: float
    unit: str
    path: str | None = None
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    min: float | None = None
    max: float | None = None
    reps: int = 1
    spread: float | None = None
    noisy: bool = False
    note: str = ""

    def finish(self) -> Row:
        """Fill in ``ratio`` (> 1: vbusemu better), ``spread`` and ``noisy``."""
        if self.baseline_value and self.value:
            lower = self.unit in LOWER_IS_BETTER
            self.ratio = (
                self.baseline_value / self.value if lower else self.value / self.baseline_value
            )
        self.spread = spread(self.value, self.min, self.max, self.reps)
        self.noisy = self.spread is not None and self.spread > NOISY_SPREAD
        return self

    def to_json(self, machine: dict[str, Any]) -> dict[str, Any]:
        out = asdict(self)
        out.pop("note")
        return {**out, "machine": machine}


def stats(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, min, max of the repetitions."""
    return statistics.median(values), min(values), max(values)


def spread(median: float, low: float | None, high: float | None, reps: int) -> float | None:
    """``(max - min) / median``; None with fewer than two repetitions or a zero median."""
    if reps < 2 or low is None or high is None or not median:
        return None
    return (high - low) / abs(median)


def row_from_reps(
    workload: str,
    params: dict[str, Any],
    metric: str,
    values: Sequence[float],
    unit: str,
    **kw: Any,
) -> Row:
    """A row whose value is the median of ``values`` (one per repetition)."""
    median, low, high = stats(values)
    return Row(
        workload, params, metric, median, unit, min=low, max=high, reps=len(values), **kw
    ).finish()


# ---------------------------------------------------------------- formatting


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def fmt_value(value: float | None, unit: str) -> str:
    """A figure with its unit, scaled to be read at a glance."""
    if value is None:
        return "-"
    if unit == "msgs/s":
        return _si(value, "msg/s")
    if unit == "ops/s":
        return _si(value, "op/s")
    if unit == "B/s":
        return _si(value, "B/s")
    if unit == "per msg":
        return f"{value:.3g}/msg"
    if unit in ("us", "s", "MiB"):
        return f"{value:,.1f} {unit}" if abs(value) >= 10 else f"{value:.3g} {unit}"
    return f"{value:.3g} {unit}"


def fmt_size(size: int) -> str:
    """Bytes as B, KiB or MiB (what the plots and the table call a size)."""
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    if size >= 1 << 10 and size % (1 << 10) == 0:
        return f"{size >> 10} KiB"
    return f"{size} B"


def fmt_case(params: dict[str, Any]) -> str:
    """A row's parameters as a short phrase: ``64 B, batch 256, event-idx, window 1024``."""
    parts = []
    for key, value in params.items():
        if key in ("payload", "size"):
            parts.append(fmt_size(int(value)))
        elif key == "batch":
            parts.append(f"batch {value}")
        elif key == "window":
            parts.append(f"window {value}")
        elif key == "vms":
            parts.append(f"{value} VM" + ("s" if value != 1 else ""))
        elif key == "live_bindings":
            parts.append(f"{value:,} bindings")
        elif key in ("kind", "mode", "placement", "process", "job", "what"):
            parts.append(str(value))
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def fmt_spread(row: Row) -> str:
    if row.spread is None:
        return f"{row.reps} rep" + ("s" if row.reps != 1 else "")
    return f"{row.spread:.0%}" + (" noisy" if row.noisy else "")


def fmt_multiple(x: float) -> str:
    return f"{x:.3g}x"


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """``row`` compared with ``ref`` (times ``ref_factor``), written as ``text``."""

    text: str
    op: str  # ">=" (at least needed x the reference) or "<=" (at most)
    needed: float
    row: tuple[str, dict[str, Any], str]  # workload, params, metric
    ref: tuple[str, dict[str, Any], str]
    why: str
    ref_factor: float = 1.0


def _small(batch: int, needed: float, why: str) -> Target:
    return Target(
        f"64 B batch {batch} >= {needed:g}x Pipe",
        ">=",
        needed,
        ("small-messages", {"batch": batch, "mode": "event-idx"}, "msgs/s"),
        ("baseline", {"kind": "pipe", "batch": batch}, "msgs/s"),
        why,
    )


def _rtt(mode: str, needed: float, why: str) -> Target:
    return Target(
        f"cross-CPU round trip, {mode} <= {needed:g}x eventfd ping-pong",
        "<=",
        needed,
        ("round-trip", {"mode": mode, "placement": "cross-cpu"}, "rtt_p50"),
        ("baseline", {"kind": "eventfd-pingpong", "placement": "cross-cpu"}, "rtt_p50"),
        why,
    )


TARGETS: list[Target] = [
    _small(
        256, 40, "reference path: Python + numpy per frame; kernels: the device's pass per wake"
    ),
    _small(16, 10, "reference path: Python per frame and per batch; kernels: the device's pass"),
    _small(1, 2, "reference path: the Python of posting one frame per publish"),
    _rtt("polling", 0.5, "both sides' Python ring work in series (no wakeups left)"),
    _rtt(
        "sleeping",
        1.5,
        "two cross-CPU wakeups, each followed by the woken side's Python (event loop, "
        "interrupt or kick bookkeeping, one kernel call, the eventfd write) on cold caches "
        "before it signals the other side",
    ),
    Target(
        "bulk 1 MiB >= 0.8x the two-copy bound (numpy copy / 2)",
        ">=",
        0.8,
        ("bulk", {"size": 1 << 20}, "bytes/s"),
        ("baseline", {"kind": "numpy-copy", "size": 1 << 20}, "bytes/s"),
        "device-bound: the guest's write and the device's copy of every byte, each "
        "reading lines the other CPU just wrote",
        ref_factor=0.5,
    ),
    Target(
        "control plane: latency @10,000 bindings <= 1.5x @10",
        "<=",
        1.5,
        ("control-plane", {"live_bindings": 10000}, "latency_p50"),
        ("control-plane", {"live_bindings": 10}, "latency_p50"),
        "indexed lookups; should not miss",
    ),
    Target(
        "scale: 4 VMs >= 0.8x 1 VM",
        ">=",
        0.8,
        ("scale", {"vms": 4}, "msgs/s"),
        ("scale", {"vms": 1}, "msgs/s"),
        "1 VM's guest and device run side by side on the 2 CPUs with no wakeup; 4 VMs "
        "take turns, a wakeup on each side per ring's worth of frames: ~60 us of "
        "interpreter time per 256-frame turn (both sides), on top of ~0.3 us of CPU per "
        "frame",
    ),
]


def find(
    rows: Sequence[Row], workload: str, params: dict[str, Any], metric: str, path: str
) -> Row | None:
    """The row measured on ``path`` (or on no path at all) matching every given param;
    a round-trip placement falls back to "any" when there was only one CPU."""
    for attempt in (params, {**params, "placement": "any"} if "placement" in params else None):
        if attempt is None:
            continue
        for r in rows:
            if (
                r.workload == workload
                and r.metric == metric
                and r.path in (path, None)
                and all(r.params.get(k) == v for k, v in attempt.items())
            ):
                return r
    return None


def evaluate(targets: Sequence[Target], rows: Sequence[Row], path: str) -> list[dict[str, Any]]:
    """Each target: the measured multiple (as the target is written), met, noisy (the
    figure or its reference is noisy), its label and, if missed, where the time goes."""
    out = []
    for t in targets:
        row, ref = find(rows, *t.row, path), find(rows, *t.ref, path)
        multiple = (
            row.value / (ref.value * t.ref_factor)
            if row is not None and ref is not None and ref.value
            else None
        )
        met = multiple is not None and (
            multiple >= t.needed if t.op == ">=" else multiple <= t.needed
        )
        noisy = any(r is not None and r.noisy for r in (row, ref))
        out.append(
            {
                "target": t.text,
                "op": t.op,
                "needed": t.needed,
                "value": multiple,
                "met": met,
                "noisy": noisy,
                "path": path,
                "label": target_label(t.text, multiple, met, noisy),
                "why_missed": None if met else t.why,
            }
        )
    return out


def target_label(text: str, multiple: float | None, met: bool, noisy: bool = False) -> str:
    """``"<= 1.5x ping-pong: 1.2x — met"``; ``"...: not measured — missed"``."""
    figure = "not measured" if multiple is None else fmt_multiple(multiple)
    return f"{text}: {figure} — {'met' if met else 'missed'}" + (" (noisy)" if noisy else "")


# ---------------------------------------------------------------- load


def load_warning(before: Sequence[float]) -> str | None:
    """The warning line for a busy machine, or None when the 1-minute load is low."""
    if before and before[0] > LOAD_WARN:
        return (
            f"WARNING: 1-minute load average {before[0]:.2f} at start (> {LOAD_WARN}): "
            "other work shares the CPUs; figures are lower and noisier than on a quiet "
            "machine"
        )
    return None


def fmt_load(load: Sequence[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


# ---------------------------------------------------------------- the table


COLUMNS = (
    "workload",
    "case",
    "path",
    "metric",
    "value",
    "spread",
    "vs baseline (>1: vbusemu better)",
    "note",
)
FOLDED = ("doorbells/msg", "interrupts/msg")
"""Metrics shown in the note of their msgs/s row rather than as rows of their own."""


def table_rows(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    """The table's cells: one line per figure, with doorbells and interrupts per message
    folded into their throughput row's note."""
    folded: dict[tuple[str, str, str | None], list[str]] = {}
    for r in rows:
        if r.metric in FOLDED:
            key = (r.workload, json.dumps(r.params, sort_keys=True), r.path)
            folded.setdefault(key, []).append(f"{r.value:.2g} {r.metric.split('/')[0]}/msg")
    out: list[tuple[str, ...]] = []
    for r in rows:
        if r.metric in FOLDED:
            continue
        note = [r.note] if r.note else []
        note += folded.get((r.workload, json.dumps(r.params, sort_keys=True), r.path), [])
        versus = "-" if r.ratio is None else f"{fmt_multiple(r.ratio)} {r.baseline}"
        out.append(
            (
                r.workload,
                fmt_case(r.params),
                r.path or "-",
                r.metric,
                fmt_value(r.value, r.unit),
                fmt_spread(r),
                versus,
                "; ".join(note),
            )
        )
    return out


def header_lines(
    machine: dict[str, Any],
    mode: str,
    reps: int,
    path: str,
    load_before: Sequence[float],
    load_after: Sequence[float] | None,
) -> list[str]:
    lines = [
        f"vbusemu bench, {mode} mode ({reps} repetitions per figure), data path {path}"
        + (" (and reference rows)" if path == KERNELS else ""),
        f"machine: {machine.get('cpu_model')}, {machine.get('cores')} cores "
        f"({machine.get('usable_cores')} usable), kernel {machine.get('kernel')}, "
        f"Python {machine.get('python')}, numpy {machine.get('numpy')}",
        f"load average (1/5/15 min): {fmt_load(load_before)} before"
        + (f", {fmt_load(load_after)} after" if load_after is not None else ""),
    ]
    warning = load_warning(load_before)
    if warning:
        lines.append(warning)
    return lines


def text_table(cells: Sequence[Sequence[str]], head: Sequence[str] = COLUMNS) -> str:
    """Aligned plain-text columns (numbers right-aligned)."""
    allrows = [tuple(head), *[tuple(c) for c in cells]]
    widths = [max(len(r[i]) for r in allrows) for i in range(len(head))]
    right = {head.index("value")} if "value" in head else set()
    out = []
    for r in allrows:
        out.append(
            "  ".join(
                (c.rjust(w) if i in right else c.ljust(w))
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def target_lines(targets: Sequence[dict[str, Any]]) -> list[str]:
    met = sum(1 for t in targets if t["met"])
    lines = [
        f"targets ({targets[0]['path'] if targets else '-'} path; multiples within this "
        f"run): {met} met, {len(targets) - met} missed"
    ]
    for t in targets:
        lines.append(f"  {t['label']}" + ("" if t["met"] else f"  [{t['why_missed']}]"))
    return lines


def console(rows: Sequence[Row], targets: Sequence[dict[str, Any]], header: Sequence[str]) -> str:
    """The one table the run prints, with its header and the targets below it."""
    return "\n".join([*header, "", text_table(table_rows(rows)), "", *target_lines(targets)])


def markdown(rows: Sequence[Row], targets: Sequence[dict[str, Any]], header: Sequence[str]) -> str:
    """``results.md``: the same table and targets in Markdown."""
    lines = [
        "# vbusemu benchmark",
        "",
        *[f"{h}  " for h in header],
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|---|---|---:|---|---|---|",
    ]
    for cells in table_rows(rows):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", "## Targets", ""]
    lines += [f"* {t['label']}" + ("" if t["met"] else f" — {t['why_missed']}") for t in targets]
    lines += [
        "",
        "Multiples are within this run, on this machine. The profiles behind each "
        "missed target, and what was tried, are in docs/performance.md.",
    ]
    return "\n".join(lines) + "\n"


def summary(
    rows: Sequence[Row], targets: list[dict[str, Any]], machine: dict[str, Any], **run: Any
) -> dict[str, Any]:
    """``summary.json``: the run (mode, path, load, elapsed...), every figure with its path
    and spread, the noisy ones, and the targets."""
    figures = [
        {
            "workload": r.workload,
            "case": fmt_case(r.params),
            "metric": r.metric,
            "path": r.path,
            "value": r.value,
            "unit": r.unit,
            "reps": r.reps,
            "spread": r.spread,
            "noisy": r.noisy,
        }
        for r in rows
    ]
    return {
        "machine": machine,
        **run,
        "load_warning": load_warning(run.get("load_before", ())),
        "figures": figures,
        "noisy": [f for f in figures if f["noisy"]],
        "targets": targets,
    }
