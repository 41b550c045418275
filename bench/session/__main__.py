"""`python -m bench.session {run,dry-run,plan,report}`: see `bench/session/__init__.py`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

from bench.session import runner
from bench.session.summary import write_summary

STAGE_NAMES = [s.name for s in runner.STAGES]


def _command(argv) -> str:
    """The command that started the session: the shell script's line when it set one, else this one."""
    return os.environ.get("FASTPO_SESSION_COMMAND") or " ".join(["python -m bench.session", *argv])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.session", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd, help_ in (("run", "model shapes on CUDA"), ("dry-run", "tiny shapes, any device")):
        p = sub.add_parser(cmd, help=help_)
        p.add_argument("out", nargs="?" if cmd == "dry-run" else None, help="output folder")
        p.add_argument("--only", nargs="+", choices=STAGE_NAMES, help="run these stages only")
        p.add_argument("--budget", type=float, default=runner.SESSION_BUDGET_S, help="session budget, seconds")
    sub.add_parser("plan", help="print each stage's plan").add_argument("--dry-run", action="store_true")
    sub.add_parser("report", help="rewrite OUT/summary.md").add_argument("out")
    stage = sub.add_parser("_stage", help=argparse.SUPPRESS)
    stage.add_argument("name", choices=STAGE_NAMES)
    stage.add_argument("out")
    stage.add_argument("--cap", type=float, required=True)
    stage.add_argument("--started", type=float, required=True)
    stage.add_argument("--mode", choices=["run", "dry-run"], required=True)
    return parser


def _session(args, argv) -> int:
    if args.cmd == "run":
        import torch

        if not torch.cuda.is_available():
            print("bench.session run measures GPU figures and needs CUDA; use dry-run here", file=sys.stderr)
            return 2
    out = args.out or tempfile.mkdtemp(prefix="fastpo-session-")
    t0 = float(os.environ.get("FASTPO_SESSION_T0") or time.time())
    return runner.run_session(out, args.cmd, only=args.only, budget_s=args.budget, t0=t0, command=_command(argv))


def _plan(dry: bool) -> int:
    for index, stage in enumerate(runner.STAGES, 1):
        plan = importlib.import_module(stage.module).plan(dry=dry)
        print(runner.describe_plan(index, stage, plan, stage.cap_s))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.cmd == "_stage":
        return runner.stage_main(args.name, args.out, args.cap, args.started, args.mode)
    if args.cmd == "plan":
        return _plan(args.dry_run)
    if args.cmd == "report":
        print(write_summary(args.out))
        return 0
    return _session(args, argv)


if __name__ == "__main__":
    sys.exit(main())
