"""vbusemu: emulate a KVM-style host -- guests, devices and a broker as real processes.

vbusemu run [topology.toml] [--timeout S]                 run a topology (main job)
vbusemu bench [--quick] [--out DIR]                       benchmarks with baselines
vbusemu demo [--policy hup|refcount|both] [--signals N]   the 2009 scenario
vbusemu soak [--seconds N] [--seed S] [--fault-every S]  faults + churn + traffic
vbusemu broker [--socket PATH] [--policy hup|refcount]    run a broker
vbusemu ps [--socket PATH] [--json]                       what a broker owns
vbusemu conform [--json] [--scenario NAME]...             the broker next to real KVM
vbusemu guest|device --channel-fd N                       (internal) what the launcher starts
"""

from __future__ import annotations

import os
import signal
import sys

from shared.lifeline import CTRL_C

# The ``vbusemu`` command: from here on Ctrl-C is recorded, never a traceback from inside
# an import; ``main`` hands it to the launcher or back to KeyboardInterrupt. run.sh starts
# us with SIGINT ignored (no window at all while Python starts) and says so.
if os.environ.pop("VBUSEMU_CTRL_C", None) == "1" or (
    os.path.basename(sys.argv[0]) == "vbusemu"
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
):
    CTRL_C.install()

import argparse
import json
from typing import Any

from hostemu.broker.limits import DEFAULT_FD_RESERVE, Quotas
from shared.channel import Channel
from shared.errors import ConfigError, VbusError
from shared.wire import Policy


def _positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number of ``kind`` above 0 (a bad one is a usage error, exit 2,
    before anything starts)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: must be above 0 (and finite)")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its messages
    return parse


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # (unwinds: every ``finally`` and ``with`` cleans up)


def _policy(name: str) -> Policy:
    try:
        return Policy[name.upper()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"policy must be hup or refcount, not {name!r}") from None


def format_state(state: dict[str, Any]) -> str:
    """The human table of ``vbusemu ps``."""
    proc = state.get("process", {})
    lines = [
        f"broker pid {proc.get('pid')}  policy {state['policy']}  "
        f"socket {proc.get('socket')}  open fds {proc.get('open_fds')} of "
        f"{proc.get('fd_limit')} (reserve {proc.get('fd_reserve')})",
        "",
    ]
    lines.append("CONNECTIONS  id  pid      uid    scope   target  handles")
    for c in state["connections"]:
        lines.append(
            f"             {c['id']:<3} {c['pid']:<8} {c['uid']:<6} {c['scope']:<7} "
            f"{c['target']:<7} {len(c['handles'])}"
        )
    lines.append("OBJECTS      id  kind     handles  bindings  broker-fd")
    for o in state["objects"]:
        lines.append(
            f"             {o['id']:<3} {o['kind']:<8} {o['handles']:<8} "
            f"{o['bindings']:<9} {o['fd']}"
        )
    lines.append("VMS          id  owner  ngsi  irqchip  guest  devices  memslots")
    for v in state["vms"]:
        lines.append(
            f"             {v['id']:<3} {v['owner']:<6} {v['ngsi']:<5} "
            f"{v['irqchip']!s:<8} {v['guest']!s:<6} {v['devices']!s:<8} "
            f"{len(v['memslots'])}"
        )
    lines.append("DEVICES      id  owner  vm   nsignals  process")
    for d in state["devices"]:
        lines.append(
            f"             {d['id']:<3} {d['owner']:<6} {d['vm']:<4} "
            f"{d['nsignals']:<9} {d['process']}"
        )
    lines.append("BINDINGS     id  kind       eventfd  state      consumer  where")
    for b in state["bindings"]:
        where = {
            k: v for k, v in b.items() if k not in ("id", "kind", "eventfd", "state", "consumer")
        }
        lines.append(
            f"             {b['id']:<3} {b['kind']:<10} {b['eventfd']:<8} "
            f"{b['state']:<10} {b['consumer']!s:<9} {where}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from hostemu.broker.server import default_socket_path

    parser = argparse.ArgumentParser(
        prog="vbusemu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{run,bench,demo,soak,broker,ps,conform}"
    )
    p = sub.add_parser(
        "run",
        help="run a topology of VMs and devices (default: two VMs "
        "through venet, each with a disk and a console)",
    )
    p.add_argument(
        "topology",
        nargs="?",
        default=None,
        help="a topology file, or a shipped example by name: two-vms (the default), echo, minimal",
    )
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=120.0,
        help="seconds the whole run may take (default 120)",
    )
    p = sub.add_parser("bench", help="measure the data path next to its baselines")
    p.add_argument("--quick", action="store_true", help="a reduced matrix (< 60 s)")
    p.add_argument("--out", default=None, help="results directory (default bench-results/…)")
    p = sub.add_parser("demo", help="the 2009 assign-then-close scenario in real processes")
    p.add_argument(
        "--policy",
        default="both",
        choices=["hup", "refcount", "both"],
        help="which release policy to play it under (default: both, one after the other)",
    )
    p.add_argument(
        "--signals", type=_positive(int), default=1000, help="signals per policy (default 1000)"
    )
    p = sub.add_parser(
        "soak",
        help="random SIGKILL/restart of guests and devices, control "
        "churn and traffic; fails on any loss or leak",
    )
    p.add_argument("--seconds", type=_positive(float), default=60.0, help="how long (default 60)")
    p.add_argument("--seed", type=int, default=None, help="fault schedule (default: random)")
    p.add_argument(
        "--fault-every",
        type=_positive(float),
        default=1.0,
        help="mean seconds between injected faults (default 1)",
    )
    p = sub.add_parser("broker", help="run a broker (the emulated host kernel)")
    p.add_argument(
        "--socket", default=default_socket_path(), help="where it listens (default: %(default)s)"
    )
    p.add_argument(
        "--policy",
        type=_policy,
        default=Policy.HUP,
        help="eventfd release policy: hup (Linux as merged, the default) or refcount",
    )
    p.add_argument(
        "--ack-timeout",
        type=_positive(float),
        default=2.0,
        help="seconds a consumer may take to acknowledge a detach",
    )
    p.add_argument(
        "--quota",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a per-connection limit: handles, vms, devices, bindings or "
        "memslots (repeatable; defaults in SECURITY.md)",
    )
    p.add_argument(
        "--fd-reserve",
        type=int,
        default=DEFAULT_FD_RESERVE,
        metavar="N",
        help=f"fds kept free for replies, dups and introspection (default {DEFAULT_FD_RESERVE})",
    )
    p.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    p = sub.add_parser("ps", help="list what a broker owns, with both reference counts")
    p.add_argument(
        "--socket", default=default_socket_path(), help="the broker's (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="the whole state as JSON")
    p = sub.add_parser(
        "conform",
        help="run the control-plane scenarios on the broker and "
        "on the real KVM (/dev/kvm) and compare them",
    )
    p.add_argument("--json", action="store_true", help="every step's observables as JSON")
    p.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this scenario (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    for name in ("guest", "device"):
        # (internal: what the launcher starts; not listed)
        p = sub.add_parser(name)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("guest", "device"):
        # (reported by the subcommand's parser, with its own usage line)
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command != "run" and CTRL_C.installed:
        CTRL_C.uninstall()  # every other command: Ctrl-C is a KeyboardInterrupt again
        if CTRL_C.pending:
            return 130
    if args.command in ("demo", "soak", "conform", "bench"):
        # SIGTERM unwinds like Ctrl-C: their temporary directories and processes go too
        signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.command == "run":
            from hostemu.run import main as run_main

            return run_main(args.topology, args.timeout)
        if args.command == "bench":
            from hostemu.bench.runner import main as bench_main

            return bench_main(args.quick, args.out)
        if args.command == "conform":
            from hostemu.conform.run import list_scenarios
            from hostemu.conform.run import main as conform_main

            if args.list:
                print(list_scenarios())
                return 0
            return conform_main(args.scenario, args.json)
        if args.command == "demo":
            from hostemu.demo import run_demo

            policies = list(Policy) if args.policy == "both" else [_policy(args.policy)]
            return run_demo(policies, signals=args.signals)
        if args.command == "soak":
            from hostemu.soak import main as soak_main

            return soak_main(args.seconds, seed=args.seed, fault_every=args.fault_every)
        if args.command == "broker":
            from hostemu.broker.server import run_broker
            from shared.loop import setup_logging

            try:
                quotas = Quotas.parse(args.quota)
            except ConfigError as e:
                parser.error(str(e))
            if args.fd_reserve < 0:
                parser.error(f"--fd-reserve {args.fd_reserve}: must be 0 or more")
            setup_logging("broker")
            return run_broker(
                args.socket,
                args.policy,
                ready_fd=args.ready_fd,
                ack_timeout=args.ack_timeout,
                quotas=quotas,
                fd_reserve=args.fd_reserve,
            )
        if args.command == "ps":
            with Channel.connect(args.socket) as ch:
                state = ch.state()
            print(json.dumps(state, indent=2, sort_keys=True) if args.json else format_state(state))
            return 0
        if args.command == "guest":
            from guestemu.guest import main as guest_main

            return guest_main(args.rest)
        if args.command == "device":
            from hostemu.device import main as device_main

            return device_main(args.rest)
    except ConfigError as e:  # a configuration value: nothing was started
        print(f"vbusemu {args.command}: {e}", file=sys.stderr)
        return 2
    except VbusError as e:
        print(f"vbusemu {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vbusemu {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``vbusemu ps | head``): quietly stop
        from shared.loop import silence_stdout

        silence_stdout()
        return 141  # as a process killed by SIGPIPE
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
