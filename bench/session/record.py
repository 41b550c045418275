"""One stage's record: metadata, plan, status, result rows and targets, kept on disk as it grows.

The JSON file is rewritten (atomically) after every case, so whatever finished before a stage was cut or
crashed is on disk; the runner then only has to correct the status. Rows are flat dicts of scalars (nested
details, e.g. every parity quantity, go under keys the Markdown leaves out).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import time
import traceback
from contextlib import contextmanager

import torch

from bench.session import targets

DISTRIBUTIONS = ("torch", "triton", "transformers", "liger-kernel", "trl", "cut-cross-entropy", "flash-attn", "peft")
"""Versions recorded with every stage (None where not installed)."""
RESERVE_S = 3.0
"""Seconds before the cap at which a stage stops starting cases (the file write and exit fit in it)."""


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_facts() -> dict:
    """Device name and kind; GPU facts only when CUDA is there (asked in the stage process, never before)."""
    if not torch.cuda.is_available():
        return {"device": f"cpu-{platform.machine()}-{os.cpu_count()}cores", "device_type": "cpu"}
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "device_type": "cuda", "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda}


def meta(stage: str, index: int, title: str, mode: str, cap_s: float, command: str, stage_command: str,
         facts: dict | None = None) -> dict:
    """Everything a result needs to be read later: stage, device, versions, date and the exact commands."""
    return {
        "stage": stage, "index": index, "title": title, "mode": mode, "cap_s": cap_s,
        **(device_facts() if facts is None else facts),
        **{name: version(name) for name in DISTRIBUTIONS}, "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "stage_command": stage_command,
    }  # fmt: skip


def device_name_without_cuda() -> str:
    """The GPU's name from nvidia-smi, or this machine's: the runner itself never opens a CUDA context (each
    stage process does, and frees the GPU when it exits)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.strip()
        return out.splitlines()[0] if out else "no GPU listed by nvidia-smi"
    except (OSError, subprocess.SubprocessError):
        return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def session_header(mode: str, command: str) -> str:
    """The first lines of the session's log: what ran where, when, with which versions."""
    versions = ", ".join(f"{name} {version(name)}" for name in DISTRIBUTIONS)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return (f"fastpo GPU session ({mode}) on {device_name_without_cuda()}, {date}\n  command: {command}\n"
            f"  python {platform.python_version()}, {versions}")


def jsonable(obj):
    """Plans hold dataclasses, tuples and dtypes: make them JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, **jsonable(dataclasses.asdict(obj))}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def stage_path(out_dir: str, index: int, name: str) -> str:
    return os.path.join(out_dir, f"{index}-{name}.json")


def load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write(path: str, data: dict) -> None:
    """Atomic rewrite with the targets re-evaluated from the rows."""
    data["targets"] = targets.evaluate(data["meta"]["stage"], data["rows"], data["meta"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


class StageRecord:
    """The file of one running stage; `deadline` is wall-clock (epoch) seconds shared with the runner."""

    def __init__(self, path: str, stage_meta: dict, started: float):
        self.path = path
        self.started = started
        self.deadline = started + stage_meta["cap_s"] - RESERVE_S
        self.data = {"meta": stage_meta, "status": "running", "elapsed_s": 0.0, "plan": None, "rows": []}
        self.cut = None
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.started, 1)
        write(self.path, self.data)

    def set_plan(self, plan) -> None:
        self.data["plan"] = jsonable(plan)
        self.write()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def out_of_time(self, next_case: str) -> bool:
        """True (and the stage marked cut) when no time is left to start `next_case`."""
        if self.cut is None and self.time_left() <= 0:
            self.cut = f"cut: the cap of {self.data['meta']['cap_s']:g} s was reached before case {next_case!r}"
        return self.cut is not None

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.write()

    @contextmanager
    def case(self, **fields):
        """Run one case: yields a dict to fill with results; the row is recorded with the case's wall time,
        or with the error (the stage goes on with its next case)."""
        row = dict(fields)
        t0 = time.time()
        try:
            yield row
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            row["error"] = f"{type(e).__name__}: {first_line}"
            row["traceback"] = traceback.format_exc()[-2000:]
            _release_memory()
        row["seconds"] = round(time.time() - t0, 2)
        self.add(row)

    def finish(self, status: str | None = None) -> None:
        self.data["status"] = status or self.cut or "complete"
        self.write()


def _release_memory() -> None:
    """After a failed case (an OOM most often), give the cached blocks back before the next case."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
