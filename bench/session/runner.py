"""The session: stages in order of value, each in its own process under a wall-clock cap.

Parent (`run_session`): for each stage, cap = min(the stage's cap, what is left of the session budget),
start `python -m bench.session _stage ...` in a new process group, wait at most the cap, kill the group if
it overruns, then correct the stage file's status (cut, crashed) and rewrite `summary.md`. The parent never
touches the GPU. Child (`stage_main`): writes its record before the heavy imports, prints its plan, runs
its cases (each checks the deadline first) and writes the record after each one.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

from bench.session import record
from bench.session.summary import all_targets, load_stages, write_summary


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    cap_s: float
    """Wall-clock cap on an H100/H200, process start, imports, compilation and warm-up included."""

    @property
    def module(self) -> str:
        return f"bench.session.{self.name}"


STAGES = (
    Stage("parity", "CUDA parity of the compiled kernels", 80),
    Stage("head", "the LM head against the bare GEMMs", 150),
    Stage("dpo", "the fused DPO loss against Liger and TRL", 70),
    Stage("train", "one DPO train step against a TRL-style padded step", 115),
    Stage("attention", "prefix-shared attention backends against separate forwards", 40),
)
SESSION_BUDGET_S = 480.0
"""8 minutes for everything, the shell's installs included (counted from FASTPO_SESSION_T0 when set)."""
MIN_STAGE_S = 15.0
"""A stage is not started with less time than this left in the budget."""


def stage_by_name(name: str) -> tuple[int, Stage]:
    for index, stage in enumerate(STAGES, 1):
        if stage.name == name:
            return index, stage
    raise ValueError(f"unknown stage {name!r}; stages: {[s.name for s in STAGES]}")


def _fallback_record(stage: Stage, index: int, mode: str, cap: float, command: str, argv: list[str]) -> dict:
    facts = {"device": "unknown: the stage process wrote no record", "device_type": "unknown"}
    return {"meta": record.meta(stage.name, index, stage.title, mode, cap, command, " ".join(argv), facts),
            "status": "running", "elapsed_s": 0.0, "plan": None, "rows": []}


def _wait(proc: subprocess.Popen, cap: float) -> int | None:
    """The exit code, or None after killing the stage's process group at the cap."""
    try:
        return proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and what it started (compiler workers, ptxas)
        except ProcessLookupError:
            pass
        proc.wait()
        return None


def run_stage(index: int, stage: Stage, out: str, cap: float, mode: str, command: str) -> dict:
    path = record.stage_path(out, index, stage.name)
    if os.path.exists(path):
        os.remove(path)
    started = time.time()
    argv = [sys.executable, "-m", "bench.session", "_stage", stage.name, out, "--cap", f"{cap:.1f}",
            "--started", f"{started:.3f}", "--mode", mode]
    env = {**os.environ, "FASTPO_SESSION_COMMAND": command, "PYTHONUNBUFFERED": "1"}
    rc = _wait(subprocess.Popen(argv, env=env, start_new_session=True), cap)
    data = record.load(path) or _fallback_record(stage, index, mode, cap, command, argv)
    if rc is None:
        data["status"] = (f"cut: killed at the cap of {cap:g} s with {len(data['rows'])} case(s) finished; "
                          "the case running then is lost")
    elif data["status"] == "running":
        data["status"] = f"error: the stage process exited with code {rc} before finishing"
    data["elapsed_s"] = round(time.time() - started, 1)
    record.write(path, data)
    return data


def _not_run(index: int, stage: Stage, out: str, mode: str, command: str, why: str) -> dict:
    """The file of a stage the session had no time left for (so that the summary lists it)."""
    data = _fallback_record(stage, index, mode, 0.0, command, [])
    data["meta"]["device"] = "none: not run"
    data["status"] = f"not run: {why}"
    record.write(record.stage_path(out, index, stage.name), data)
    return data


def _problems(data: dict) -> list[str]:
    """What makes a stage not clean: a status other than complete, a case that raised or missed its bound."""
    out = [] if data["status"] == "complete" else [data["status"]]
    for row in data["rows"]:
        if "error" in row:
            out.append(f"case {_label(row)}: {row['error']}")
        elif row.get("ok") is False:
            out.append(f"case {_label(row)}: {row['worst']} error {row['err']:.3g} > bound {row['bound']:.3g}")
    return out


def _label(row: dict) -> str:
    keys = ("op", "case", "provider", "mode", "arch", "backend", "dtype")
    return "/".join(str(row[k]) for k in keys if k in row)


def run_session(out: str, mode: str, only=None, budget_s: float = SESSION_BUDGET_S, t0: float | None = None,
                command: str = "") -> int:
    """Run the stages; 0 when every stage ran clean, 1 otherwise (the files say what happened)."""
    os.makedirs(out, exist_ok=True)
    t0 = time.time() if t0 is None else t0
    print(record.session_header(mode, command), flush=True)
    problems = []
    for index, stage in enumerate(STAGES, 1):
        if only and stage.name not in only:
            continue
        cap = min(stage.cap_s, t0 + budget_s - time.time())
        if cap < MIN_STAGE_S:
            data = _not_run(index, stage, out, mode, command, f"{max(cap, 0):.0f} s left of the {budget_s:g} s budget")
        else:
            data = run_stage(index, stage, out, cap, mode, command)
        print(f"-- {stage.name}: {data['status']} in {data['elapsed_s']:g} s (cap {cap:g} s), "
              f"{len(data['rows'])} case(s)", flush=True)
        problems += [f"{stage.name}: {p}" for p in _problems(data)]
        write_summary(out)
    print(all_targets(load_stages(out)))
    print(f"== session: {time.time() - t0:.1f} s; results in {out} ({'clean' if not problems else 'see below'})")
    for p in problems:
        print(f"   {p}")
    return 1 if problems else 0


def describe_plan(index: int, stage: Stage, plan, cap: float) -> str:
    lines = [f"== stage {index}/{len(STAGES)} {stage.name}: {stage.title} (cap {cap:g} s)"]
    lines += [f"   {k}: {json.dumps(record.jsonable(v))}" for k, v in plan.items()]
    return "\n".join(lines)


def stage_main(name: str, out: str, cap: float, started: float, mode: str) -> int:
    """The stage process: record first, then the heavy imports, the plan and the cases."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    index, stage = stage_by_name(name)
    stage_command = " ".join([sys.executable, "-m", "bench.session", *sys.argv[1:]])
    command = os.environ.get("FASTPO_SESSION_COMMAND") or stage_command
    rec = record.StageRecord(record.stage_path(out, index, name),
                             record.meta(name, index, stage.title, mode, cap, command, stage_command), started)
    try:
        module = importlib.import_module(stage.module)
        plan = module.plan(dry=mode == "dry-run")
        print(describe_plan(index, stage, plan, cap), flush=True)
        rec.set_plan(plan)
        module.run(rec, plan)
    except Exception:  # noqa: BLE001 - the record must say why the stage stopped
        rec.finish("error: " + traceback.format_exc()[-1500:])
        return 1
    rec.finish()
    return 0
