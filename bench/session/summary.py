"""`OUT/summary.md`: every target against its goal, the stages' status, then one section per stage.

Rewritten from the stage files after each stage ends (and by `python -m bench.session report OUT`), so it
always matches the JSON beside it. Tables and ratios come from `bench.report`.
"""

from __future__ import annotations

import glob
import os
import re

from bench import report
from bench.session import record

META_KEYS = ("device", "capability", "cuda", "torch", "triton", "transformers", "liger-kernel", "trl",
             "cut-cross-entropy", "flash-attn", "python", "triton_interpret", "date", "command")
HIDDEN = ("test", "traceback", "quantities")
"""Row fields left out of the tables (kept in the JSON)."""


def stage_files(out_dir: str) -> list[str]:
    """`<n>-<stage>.json` files in stage order."""
    paths = glob.glob(os.path.join(out_dir, "[0-9]*-*.json"))
    return sorted(paths, key=lambda p: int(re.match(r"(\d+)-", os.path.basename(p)).group(1)))


def _scalars(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in HIDDEN and not isinstance(v, (dict, list))}


def _plan_lines(plan) -> str:
    if not isinstance(plan, dict):
        return "- plan: not written (the stage ended before it)\n"
    return "".join(f"- {k}: `{record.jsonable(v)}`\n" for k, v in plan.items())


def targets_table(rows: list[dict]) -> str:
    lines = ["| stage | target | measured | goal | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['target']} | {report.fmt(r['measured'])} | {r['goal']} | {r['verdict']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def stage_section(data: dict) -> str:
    meta = data["meta"]
    head = (f"## {meta.get('index', '')}. {meta['stage']}: {meta.get('title', '')}\n\n"
            f"Status: **{data['status']}** after {data.get('elapsed_s', 0):g} s (cap {meta.get('cap_s', 0):g} s); "
            f"{meta.get('mode')} on {meta.get('device')}; `{meta.get('stage_command', '')}`\n\n")
    rows = [_scalars(r) for r in report.add_ratios(data.get("rows", []))]
    body = report.table(rows) if rows else "No case finished.\n"
    return head + _plan_lines(data.get("plan")) + "\n" + body


def document(stages: list[dict]) -> str:
    meta = next((d["meta"] for d in stages if d["meta"].get("device")), {})
    gpu = meta.get("device_type") == "cuda" and meta.get("mode") == "run"
    doc = f"# fastpo GPU session: {meta.get('device', 'unknown device')} ({meta.get('mode', '')})\n\n"
    doc += "".join(f"- {k}: `{meta[k]}`\n" for k in META_KEYS if k in meta) + "\n"
    if not gpu:
        doc += "**Not a GPU measurement**: a dry run or a run off CUDA checks the code, not the figures.\n\n"
    doc += report.RATIO_NOTE + "\n\n## Targets\n\n" + all_targets(stages)
    doc += "\n## Stages\n\n| # | stage | status | elapsed_s | cap_s | cases |\n|---|---|---|---|---|---|\n"
    doc += "".join(f"| {d['meta'].get('index', '')} | {d['meta']['stage']} | {d['status']} | {d.get('elapsed_s')} | "
                   f"{d['meta'].get('cap_s')} | {len(d.get('rows', []))} |\n" for d in stages)
    return doc + "\n" + "\n".join(stage_section(d) for d in stages)


def load_stages(out_dir: str) -> list[dict]:
    return [d for d in (record.load(p) for p in stage_files(out_dir)) if d is not None]


def all_targets(stages: list[dict]) -> str:
    """The targets table of every stage: what a session prints last, where a device call's output ends."""
    return targets_table([{"stage": d["meta"]["stage"], **t} for d in stages for t in d.get("targets", [])])


def write_summary(out_dir: str) -> str:
    stages = load_stages(out_dir)
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as f:
        f.write(document(stages))
    return path
