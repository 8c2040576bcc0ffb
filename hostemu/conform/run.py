"""Run scenarios on both backends, compare step by step, print the table.

Verdicts per step: ``same``; ``deviation`` (different, and the step cites a documented
deliberate deviation); ``known bug`` (different, and the step cites a documented open
bug); ``DIFFERENT`` (any other difference: a bug nobody has written down yet, or a
deviation nobody has documented). A step that cites a deviation but shows no difference
is ``same`` with a note, so stale citations are visible.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostemu import kvm as K
from hostemu.conform.backends import (
    INJECT_PATIENT,
    INJECT_QUIET,
    BrokerBackend,
    KernelBackend,
    Observation,
)
from hostemu.conform.deviations import DEVIATIONS
from hostemu.conform.scenarios import BY_NAME, SCENARIOS, Scenario, Step

SAME, DEVIATION, KNOWN_BUG, DIFFERENT = "same", "deviation", "known bug", "DIFFERENT"


@dataclass
class StepResult:
    index: int
    step: Step
    kernel: Observation
    broker: Observation
    verdict: str
    note: str = ""

    @property
    def unexpected(self) -> bool:
        """A difference no deviation explains, or a cited deviation that did not show."""
        return self.verdict == DIFFERENT or (self.verdict == SAME and bool(self.step.deviation))

    def as_json(self) -> dict[str, Any]:
        return {
            "step": self.index,
            "op": self.step.describe(),
            "kernel": self.kernel,
            "vbusemu": self.broker,
            "verdict": self.verdict,
            "cites": self.step.deviation,
            "note": self.note,
        }


@dataclass
class ScenarioResult:
    scenario: Scenario
    steps: list[StepResult] = field(default_factory=list)

    @property
    def different(self) -> bool:
        return any(s.verdict == DIFFERENT for s in self.steps)

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.name,
            "doc": self.scenario.doc,
            "irqchip": self.scenario.irqchip,
            "policy": self.scenario.policy,
            "steps": [s.as_json() for s in self.steps],
        }


def verdict(step: Step, kernel: Observation, broker: Observation) -> tuple[str, str]:
    cited = DEVIATIONS.get(step.deviation) if step.deviation else None
    if step.deviation and cited is None:
        raise KeyError(f"step {step.describe()} cites unknown deviation {step.deviation!r}")
    if kernel == broker:
        note = f"cites {step.deviation} but no difference" if cited else ""
        return SAME, note
    if cited is None:
        return DIFFERENT, ""
    return (DEVIATION if cited.kind == "deviation" else KNOWN_BUG), cited.name


def compare(scenario: Scenario, kernel: KernelBackend, broker: BrokerBackend) -> ScenarioResult:
    result = ScenarioResult(scenario)
    for i, step in enumerate(scenario.steps, 1):
        k = kernel.step(step)
        b = broker.step(step)
        v, note = verdict(step, k, b)
        result.steps.append(StepResult(i, step, k, b, v, note))
    return result


class Conformance:
    """The real KVM plus one broker per release policy (started on first use)."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._brokers: dict[str, str] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="vb-conform-"))
        self._stack.callback(shutil.rmtree, self.dir, True)
        try:
            self.kvm = self._stack.enter_context(K.Kvm())
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> Conformance:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _broker(self, policy: str) -> str:
        from hostemu.launcher import start_broker
        from shared.wire import Policy

        if policy not in self._brokers:
            run = self.dir / policy
            run.mkdir(mode=0o700)
            with open(self.dir / f"broker-{policy}.log", "w") as log:
                proc = start_broker(
                    str(run / "broker.sock"), Policy[policy.upper()], stderr=log, stdout=log
                )
            self._stack.callback(proc.stop)
            self._brokers[policy] = str(run / "broker.sock")
        return self._brokers[policy]

    def run(self, scenario: Scenario) -> ScenarioResult:
        """Run ``scenario`` on both sides. A step that raises nothing is watched for a
        quick window; where the result shows a difference nobody expected (a step that
        differs without citing a deviation, or cites one and shows none), the scenario
        runs again with a patient window and that run is the answer -- an injection that
        came late on a loaded machine is not a difference."""
        result = self._run(scenario, INJECT_QUIET)
        if any(s.unexpected for s in result.steps):
            result = self._run(scenario, INJECT_PATIENT)
        return result

    def _run(self, scenario: Scenario, quiet: float) -> ScenarioResult:
        socket = self._broker(scenario.policy)
        with (
            KernelBackend(self.kvm, scenario, quiet) as kernel,
            BrokerBackend(socket, scenario, self.dir, quiet) as broker,
        ):
            return compare(scenario, kernel, broker)

    def run_all(self, scenarios: Iterable[Scenario]) -> Iterator[ScenarioResult]:
        for s in scenarios:
            yield self.run(s)


# ------------------------------------------------------------------ presentation


def _cell(obs: Observation) -> str:
    parts = [obs.get("result", "?")]
    if "exit" in obs:
        ex = obs["exit"]
        parts.append("absorbed" if ex == "absorbed" else "exit " + "; ".join(ex))
    if "injected" in obs:
        parts.append("irq " + (",".join(map(str, obs["injected"])) or "-"))
    if "took" in obs:
        parts.append("took " + (",".join(map(str, obs["took"])) or "-"))
    if "asserted" in obs:
        parts.append("asserted " + ",".join(map(str, obs["asserted"])))
    counters = obs.get("counters") or {}
    if counters:
        parts.append(" ".join(f"{n}={v}" for n, v in counters.items()))
    return " | ".join(parts)


def format_table(results: Iterable[ScenarioResult]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    for r in results:
        for s in r.steps:
            label = f"{r.scenario.name} #{s.index} {s.step.describe()}"
            v = s.verdict + (f" ({s.note})" if s.note else "")
            rows.append((label, _cell(s.broker), _cell(s.kernel), v))
    head = ("scenario/step", "vbusemu", "kernel", "verdict")
    widths = [
        min(max(len(row[i]) for row in [head, *rows]), cap)
        for i, cap in enumerate((72, 44, 44, 40))
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def summary(results: list[ScenarioResult]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        for s in r.steps:
            counts[s.verdict] = counts.get(s.verdict, 0) + 1
    parts = [f"{counts.get(k, 0)} {k}" for k in (SAME, DEVIATION, KNOWN_BUG, DIFFERENT)]
    return (
        f"{len(results)} scenario{'' if len(results) == 1 else 's'}, "
        + ", ".join(parts)
        + " (steps)"
    )


def list_scenarios() -> str:
    return "\n".join(f"{s.name:<40} {s.doc}" for s in SCENARIOS)


def main(names: list[str], as_json: bool) -> int:
    """``vbusemu conform``: 0 when every difference is documented, 1 otherwise, 2 on
    bad usage (an unknown scenario) or when KVM cannot be used here."""
    import sys

    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(
            f"vbusemu conform: unknown scenario{'' if len(unknown) == 1 else 's'} "
            f"{', '.join(map(repr, unknown))} (see --list)",
            file=sys.stderr,
        )
        return 2
    why = K.unusable()
    if why is not None:
        print(f"vbusemu conform: cannot use KVM here: {why}", file=sys.stderr)
        return 2
    chosen = [BY_NAME[n] for n in dict.fromkeys(names)] if names else list(SCENARIOS)
    with Conformance() as c:
        results = list(c.run_all(chosen))
    if as_json:
        print(json.dumps([r.as_json() for r in results], indent=2))
    else:
        print(format_table(results))
        print()
        print(summary(results))
    return 1 if any(r.different for r in results) else 0
