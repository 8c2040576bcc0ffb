"""``vbusemu bench``: vbusemu's data path measured next to its baselines, in one run.

Theory of operation
-------------------
One broker (release policy ``refcount``) serves the whole run. Each vbusemu figure comes
from a real VMM run (``python -m hostemu.vmm``) whose guests push frames through the full
emulated path -- guest driver -> split ring in shared memory -> ioeventfd doorbell -> echo
device process -> used ring -> irqfd interrupt -> guest -- and report what they measured
themselves (:mod:`guestemu.workloads.echo`). The control-plane figures come from a client
talking to the broker directly. Baselines (:mod:`hostemu.bench.baselines`) run in the same
process tree, same sizes, same run, between the vbusemu measurements.

Every figure is the median of ``reps`` repetitions (min and max kept). A row's ``ratio`` is
oriented so that > 1 means vbusemu is better: value / baseline for throughputs, baseline /
value for latencies. The benchmark asserts nothing; the targets of the issue are evaluated
and reported as met or missed.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hostemu.bench import baselines
from hostemu.launcher import ManagedProcess, python_module, start_broker
from shared.channel import Channel
from shared.errors import VbusError
from shared.wire import Policy

POLL_WINDOW_NS = 2_000_000
"""Round trip "polling": the guest's halt-poll and the device's busy-poll window."""
MODES = {  # notification mode -> (echo notify param, guest halt-poll ns)
    "notify-always": ("always", 0),
    "event-idx": ("event_idx", 0),
    "adaptive-poll": ("event_idx", -1),
}


@dataclass
class Row:
    workload: str
    params: dict[str, Any]
    metric: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    min: float | None = None
    max: float | None = None
    reps: int = 1


@dataclass
class Plan:
    quick: bool
    reps: int
    seconds: float  # per baseline measurement
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 1, 0.3, {"small1": 600, "small": 3000, "rtt": 300,
                                      "bulk64k": 300, "bulk1m": 30, "scale": 1500,
                                      "ops": 200})
        return cls(False, 3, 1.0, {"small1": 3000, "small": 30000, "rtt": 2000,
                                   "bulk64k": 3000, "bulk1m": 200, "scale": 6000,
                                   "ops": 1000})


class BenchError(VbusError):
    """A measurement could not be taken (its processes failed); the run stops."""


def _stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


class Bench:
    def __init__(self, plan: Plan, sock: str, say: Callable[[str], None]) -> None:
        self.plan = plan
        self.sock = sock
        self.say = say
        self.rows: list[Row] = []

    # ------------------------------------------------------------------ vbusemu runs

    def run_vms(self, vms: list[dict[str, Any]], timeout: float = 120) -> dict[str, Any]:
        out = subprocess.run(
            python_module("hostemu.vmm", "--socket", self.sock, "--spec", json.dumps(vms),
                          "--timeout", str(timeout)),
            capture_output=True, text=True, timeout=timeout + 60)
        done = [json.loads(line) for line in out.stdout.splitlines()
                if line.startswith('{"event": "vmm_done"')]
        if not done or out.returncode != 0:
            raise BenchError(f"VMM run failed ({out.returncode}): {out.stdout[-800:]} "
                             f"{out.stderr[-800:]}")
        result: dict[str, Any] = done[-1]
        return result

    @staticmethod
    def echo_vm(name: str, params: dict[str, Any], halt_poll_ns: int = -1,
                memory: int = 32 << 20,
                device: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"name": name, "memory": memory,
                "devices": [{"model": "echo", "name": "echo0", "params": device or {}}],
                "workload": ["--workload", "echo", "--params", json.dumps(params),
                             "--halt-poll-ns", str(halt_poll_ns)]}

    def echo_metric(self, params: dict[str, Any], halt_poll_ns: int, metric: str,
                    scale: float = 1.0, memory: int = 32 << 20) -> float:
        return float(self.echo(params, halt_poll_ns, memory)[metric]) * scale

    def echo(self, params: dict[str, Any], halt_poll_ns: int = -1,
             memory: int = 32 << 20, device: dict[str, Any] | None = None) -> dict[str, Any]:
        result = self.run_vms([self.echo_vm("vm0", params, halt_poll_ns, memory, device)])
        r: dict[str, Any] = result["results"]["vm0"]
        if not r.get("ok"):
            raise BenchError(f"echo workload failed: {r.get('error')}")
        return r

    # ------------------------------------------------------------------ bookkeeping

    def repeat(self, fn: Callable[[], float]) -> tuple[float, float, float]:
        return _stats([fn() for _ in range(self.plan.reps)])

    def add(self, row: Row) -> Row:
        if row.baseline_value:
            better_lower = row.unit in ("us", "s")
            row.ratio = (row.baseline_value / row.value if better_lower
                         else row.value / row.baseline_value) if row.value else None
        self.rows.append(row)
        ratio = f"  ({row.ratio:.2f}x {row.baseline})" if row.ratio is not None else ""
        self.say(f"  {row.workload:<14} {json.dumps(row.params, sort_keys=True):<48} "
                 f"{row.metric:<12} {row.value:>14,.1f} {row.unit}{ratio}")
        return row

    # ------------------------------------------------------------------ workloads

    def small_messages(self) -> None:
        """64 B guest -> host (and back: echo) at batch 1, 16, 256, three notify modes."""
        for batch in (1, 16, 256):
            base, bmin, bmax = self.repeat(functools.partial(
                baselines.small_messages, "pipe", 64, batch, self.plan.seconds))
            self.add(Row("baseline", {"kind": "pipe", "payload": 64, "batch": batch},
                         "msgs/s", base, "msgs/s", min=bmin, max=bmax, reps=self.plan.reps))
            count = self.plan.counts["small1" if batch == 1 else "small"]
            for mode, (notify, halt) in MODES.items():
                params = {"count": count, "size": 64, "batch": batch, "notify": notify}
                v, vmin, vmax = self.repeat(
                    functools.partial(self.echo_metric, params, halt, "frames_per_s"))
                self.add(Row("small-messages", {"payload": 64, "batch": batch, "mode": mode},
                             "msgs/s", v, "msgs/s", "multiprocessing.Pipe", base, min=vmin,
                             max=vmax, reps=self.plan.reps))

    def round_trip(self) -> None:
        samples = self.plan.counts["rtt"]
        rtts = baselines.round_trip("eventfd", 8, samples)
        base = {"p50": statistics.median(rtts) * 1e6,
                "p99": sorted(rtts)[max(0, int(len(rtts) * 0.99) - 1)] * 1e6}
        for q, v in base.items():
            self.add(Row("baseline", {"kind": "eventfd-pingpong"}, f"rtt_{q}", v, "us"))
        # polling: the guest's vCPU halt-polls and the device busy-polls its TX ring (vhost's
        # busyloop), both for up to POLL_WINDOW_NS after the last event; sleeping: neither.
        for mode, halt, device in (("sleeping", 0, {}),
                                   ("polling", POLL_WINDOW_NS,
                                    {"busy_poll_us": POLL_WINDOW_NS // 1000})):
            reps = [self.echo({"count": samples, "size": 64, "batch": 1, "window": 1}, halt,
                              device=device)
                    for _ in range(self.plan.reps)]
            for q in ("p50", "p99"):
                vals = [float(r[f"rtt_{q}_us"]) for r in reps]
                v, vmin, vmax = _stats(vals)
                self.add(Row("round-trip", {"payload": 64, "mode": mode}, f"rtt_{q}", v, "us",
                             "eventfd ping-pong", base[q], min=vmin, max=vmax,
                             reps=self.plan.reps))

    def bulk(self) -> None:
        for size, key in ((64 << 10, "bulk64k"), (1 << 20, "bulk1m")):
            pipe, _, _ = self.repeat(functools.partial(
                baselines.bulk, "pipe", size, self.plan.seconds))
            copy, _, _ = self.repeat(functools.partial(
                baselines.bulk, "numpy-copy", size, self.plan.seconds))
            self.add(Row("baseline", {"kind": "pipe", "size": size}, "bytes/s", pipe, "B/s"))
            self.add(Row("baseline", {"kind": "numpy-copy", "size": size}, "bytes/s", copy,
                         "B/s"))
            params = {"count": self.plan.counts[key], "size": size, "batch": 8, "qsize": 16}
            v, vmin, vmax = self.repeat(functools.partial(
                self.echo_metric, params, -1, "mb_per_s", 1e6, 64 << 20))
            self.add(Row("bulk", {"size": size}, "bytes/s", v, "B/s", "multiprocessing.Pipe",
                         pipe, min=vmin, max=vmax, reps=self.plan.reps))

    def control_plane(self) -> None:
        """ioeventfd assign+deassign latency with 10, 1,000 and 10,000 live bindings."""
        ops = self.plan.counts["ops"]
        lat10: float | None = None
        for live in (10, 1000, 10000):
            with Channel.connect(self.sock) as ch:
                vm = ch.vm_create(8)
                handle = ch.eventfd_create()
                for i in range(live):
                    ch.ioeventfd(vm, handle, 0x1000_0000 + 8 * i, 4)
                lats = []
                start = time.perf_counter()
                for i in range(ops):
                    t0 = time.perf_counter()
                    ch.ioeventfd(vm, handle, 0x2000_0000 + 8 * i, 4)
                    ch.ioeventfd(vm, handle, 0x2000_0000 + 8 * i, 4, deassign=True)
                    lats.append((time.perf_counter() - t0) / 2)
                elapsed = time.perf_counter() - start
                ch.vm_destroy(vm)
                ch.handle_close(handle)
            lat = statistics.median(lats) * 1e6
            self.add(Row("control-plane", {"live_bindings": live}, "ops/s", 2 * ops / elapsed,
                         "ops/s"))
            row = self.add(Row("control-plane", {"live_bindings": live}, "latency_p50", lat,
                               "us", None if live == 10 else "vbusemu@10 bindings", lat10))
            if live == 10:
                lat10 = row.value

    def scale(self) -> None:
        one: float | None = None
        for n in (1, 2, 4, 8):
            def aggregate(n: int = n) -> float:
                params = {"count": self.plan.counts["scale"], "size": 64, "batch": 16}
                result = self.run_vms([self.echo_vm(f"vm{i}", params, memory=8 << 20)
                                       for i in range(n)], timeout=180)
                rs = list(result["results"].values())
                if len(rs) != n or not all(r.get("ok") for r in rs):
                    raise BenchError(f"scale run with {n} VMs failed: {rs}")
                return float(sum(r["frames"] for r in rs) / max(r["elapsed"] for r in rs))
            v, vmin, vmax = self.repeat(aggregate)
            row = self.add(Row("scale", {"vms": n}, "msgs/s", v, "msgs/s",
                               None if n == 1 else "vbusemu@1 VM", one, min=vmin, max=vmax,
                               reps=self.plan.reps))
            if n == 1:
                one = row.value


TARGETS: list[tuple[str, str, dict[str, Any], str, float]] = [
    # (description, workload, params, metric, minimum ratio)
    ("64 B, batch 256, EVENT_IDX >= 25x Pipe", "small-messages",
     {"batch": 256, "mode": "event-idx"}, "msgs/s", 25.0),
    ("64 B, batch 1 >= 1.5x Pipe", "small-messages", {"batch": 1, "mode": "event-idx"},
     "msgs/s", 1.5),
    ("round trip, sleeping <= 1.3x eventfd ping-pong", "round-trip", {"mode": "sleeping"},
     "rtt_p50", 1 / 1.3),
    ("round trip, polling <= 0.2x eventfd ping-pong", "round-trip", {"mode": "polling"},
     "rtt_p50", 1 / 0.2),
    ("bulk 1 MiB >= 8x Pipe", "bulk", {"size": 1 << 20}, "bytes/s", 8.0),
    ("control plane: latency @10,000 <= 1.5x @10", "control-plane", {"live_bindings": 10000},
     "latency_p50", 1 / 1.5),
    ("scale: 4 VMs >= 0.8x 1 VM", "scale", {"vms": 4}, "msgs/s", 0.8),
]


def evaluate_targets(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for text, workload, params, metric, minimum in TARGETS:
        match = [r for r in rows if r.workload == workload and r.metric == metric
                 and all(r.params.get(k) == v for k, v in params.items())]
        ratio = match[0].ratio if match else None
        out.append({"target": text, "ratio": ratio, "needed": minimum,
                    "met": ratio is not None and ratio >= minimum})
    return out


def markdown(rows: list[Row], targets: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = ["# vbusemu benchmark", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), "",
             "| workload | params | metric | value | unit | baseline | baseline value | "
             "ratio (>1: vbusemu better) | min | max |",
             "|---|---|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:,.1f}"
        lines.append(f"| {r.workload} | {json.dumps(r.params, sort_keys=True)} | {r.metric} | "
                     f"{f(r.value)} | {r.unit} | {r.baseline or '-'} | {f(r.baseline_value)} | "
                     f"{'-' if r.ratio is None else f'{r.ratio:.2f}'} | {f(r.min)} | "
                     f"{f(r.max)} |")
    lines += ["", "## Targets", "", "| target | ratio | needed | met |", "|---|---:|---:|---|"]
    for t in targets:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(f"| {t['target']} | {ratio} | {t['needed']:.2f} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _save(plt: Any, fig: Any, ax: Any, path: Path, **settings: str) -> str:
    ax.set(**settings)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def plots(rows: list[Row], outdir: Path) -> list[str]:
    """PNG plots if matplotlib is installed; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES:
        pts = sorted((r.params["batch"], r.value) for r in rows
                     if r.workload == "small-messages" and r.params.get("mode") == mode)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"vbusemu {mode}")
    pts = sorted((r.params["batch"], r.value) for r in rows
                 if r.workload == "baseline" and r.params.get("kind") == "pipe"
                 and "batch" in r.params)
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="s", linestyle="--", label="multiprocessing.Pipe")
    written.append(_save(plt, fig, ax, outdir / "throughput_vs_batch.png", xscale="log",
                         yscale="log", xlabel="batch size", ylabel="messages/s",
                         title="64 B messages: throughput vs batch size"))

    fig, ax = plt.subplots(figsize=(7, 4))
    series: list[tuple[str, Callable[[Row], bool]]] = [
        ("vbusemu", lambda r: r.workload == "bulk"),
        ("Pipe", lambda r: r.workload == "baseline" and r.params.get("kind") == "pipe"
         and "size" in r.params),
        ("numpy copy", lambda r: r.params.get("kind") == "numpy-copy")]
    for label, pred in series:
        pts = sorted((r.params["size"], r.value / 1e6) for r in rows if pred(r))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    written.append(_save(plt, fig, ax, outdir / "throughput_vs_payload.png", xscale="log",
                         yscale="log", xlabel="payload size (bytes)", ylabel="MB/s",
                         title="bulk: throughput vs payload size"))

    fig, ax = plt.subplots(figsize=(7, 4))
    labels, p50, p99 = [], [], []
    for r in rows:
        if r.metric == "rtt_p50":
            mate = [x for x in rows if x.metric == "rtt_p99" and x.params == r.params
                    and x.workload == r.workload]
            labels.append(f"{r.workload}\n{r.params.get('mode', r.params.get('kind'))}")
            p50.append(r.value)
            p99.append(mate[0].value if mate else 0)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
    ax.set_xticks(list(xs), labels, fontsize=8)
    written.append(_save(plt, fig, ax, outdir / "latency.png", ylabel="round trip (us)",
                         yscale="log", title="round-trip latency"))
    return written


def main(quick: bool, out: str | None) -> int:
    plan = Plan.make(quick)
    outdir = Path(out) if out else Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(text, flush=True)

    say(f"vbusemu bench ({'quick' if quick else 'full'}): results in {outdir}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vbusemu-bench-") as tmp:
        os.chmod(tmp, 0o700)
        sock = os.path.join(tmp, "broker.sock")
        with open(os.path.join(tmp, "broker.log"), "w") as log:
            broker: ManagedProcess = start_broker(sock, Policy.REFCOUNT, stderr=log,
                                                  stdout=log)
            bench = Bench(plan, sock, say)
            try:
                steps = [bench.small_messages, bench.round_trip, bench.bulk,
                         bench.control_plane, bench.scale]
                for i, step in enumerate(steps, 1):
                    say(f"[{i}/{len(steps)}] {step.__name__.replace('_', ' ')} "
                        f"({time.monotonic() - started:.0f} s)")
                    step()
            except BenchError as e:
                say(f"FAILED: {e}")
                return 1
            finally:
                broker.stop()
    machine = baselines.machine_info()
    targets = evaluate_targets(bench.rows)
    rows = [{**asdict(r), "machine": machine} for r in bench.rows]
    (outdir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    summary = {"machine": machine, "mode": "quick" if quick else "full",
               "elapsed_s": time.monotonic() - started, "targets": targets}
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(bench.rows, targets, machine)
    (outdir / "results.md").write_text(table)
    pngs = plots(bench.rows, outdir)
    say("")
    say(table)
    say(f"wrote {outdir / 'results.json'}, {outdir / 'results.md'}"
        + (f", {', '.join(pngs)}" if pngs else " (no plots: matplotlib is not installed)"))
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main("--quick" in sys.argv, None))
