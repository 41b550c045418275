"""Run logging on rank 0: progress bar, JSONL metrics, TensorBoard, and PNG plots at the end.

<out_dir>/metrics.jsonl holds whole JSON lines only, of two kinds:

    {"run": {"id": "3f2a9c0d1b7e", "started": "2025-01-01T12:00:00+00:00", "config_hash": "...",
             "resumed_from": null, "fastpo_version": "0.1.0"}}      a header, when a run starts
    {"step": 12, "loss": 0.61, ...}                                  the metrics of a step or an evaluation

Each line goes out in one os.write on a file opened with O_APPEND, and opening the file drops a trailing
partial line left by a crash, so a later run never keeps half a record. Headers tell runs appended to one file
apart. A resumed run first removes the step records its lineage (the runs back to the last fresh start)
wrote after the resumed step: they belong to the interrupted run, so every step is logged once.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import uuid

PLOTTED = (("loss", "eval/loss"), ("rewards/accuracies", "eval/rewards/accuracies"),
           ("rewards/margins", "eval/rewards/margins"))
METRICS_FILE = "metrics.jsonl"


class RunLog:
    """Writes metrics of every step; a no-op on ranks other than 0.

    `config_hash` (fastpo.checkpoint.config_hash of the run's config) and `resumed_from` (the step of the
    checkpoint the run resumed from; None for a fresh start) go into the run's header line.
    """

    def __init__(self, cfg, total_steps: int, *, enabled: bool, initial_step: int = 0, config_hash: str | None = None,
                 resumed_from: int | None = None):
        self.cfg, self.enabled = cfg.logging, enabled
        self.run_id = uuid.uuid4().hex[:12]
        self.records = []
        self.bar = self.fd = self.tb = None
        if not enabled:
            return
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        if self.cfg.jsonl:
            self.fd = open_metrics(os.path.join(self.cfg.out_dir, METRICS_FILE), resumed_from)
            self._write(run_header(self.run_id, config_hash, resumed_from))
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.cfg.out_dir, "tensorboard"))
        if self.cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict):
        """One record per call; an empty `metrics` (an evaluation without eval examples) writes nothing."""
        if not self.enabled or not metrics:
            return
        record = {"step": step, **metrics}
        self.records.append(record)
        if self.fd is not None:
            self._write(record)
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.bar is not None and "loss" in metrics:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", **progress_fields(metrics))

    def message(self, text: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self, history: list | None = None):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tb:
            self.tb.close()
        if plots_enabled(self.cfg):
            plot(history or self.records, os.path.join(self.cfg.out_dir, "plots"))

    def _write(self, record: dict):
        """The whole line in one write: with O_APPEND, a crash leaves the line whole or at most a partial tail,
        which the next `open_metrics` drops."""
        data = memoryview((json.dumps(record) + "\n").encode())
        while data:
            data = data[os.write(self.fd, data):]


def run_header(run_id: str, config_hash: str | None, resumed_from: int | None) -> dict:
    from fastpo import __version__

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"run": {"id": run_id, "started": started, "config_hash": config_hash, "resumed_from": resumed_from,
                    "fastpo_version": __version__}}


def plots_enabled(cfg) -> bool:
    """--logging.plots: true or false as given; none (the default) means on when matplotlib is installed."""
    if cfg.plots is not None:
        return cfg.plots
    return importlib.util.find_spec("matplotlib") is not None


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------------------


def open_metrics(path: str, resumed_from: int | None = None) -> int:
    """An O_APPEND descriptor of metrics file `path` after dropping a trailing partial line and, on a resume
    from step `resumed_from`, the step records after it that the interrupted lineage wrote."""
    drop_partial_tail(path)
    if resumed_from is not None:
        drop_steps_after(path, resumed_from)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def drop_partial_tail(path: str) -> None:
    """Truncate `path` after its last newline: the bytes past it are a record a crash cut short."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        size = end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        if end < size:
            f.truncate(end)


def drop_steps_after(path: str, step: int) -> None:
    """Remove the step records after `step` written by the current lineage: the runs from the last fresh
    start (a header with "resumed_from": null; the whole file when there is none) to the end. Earlier runs
    are untouched. Rewritten through a temporary file and os.replace, so a crash keeps the old file."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    records = [_parse(line) for line in lines]
    fresh = [i for i, r in enumerate(records) if "run" in r and r["run"].get("resumed_from") is None]
    begin = fresh[-1] if fresh else 0
    kept = lines[:begin] + [line for line, r in zip(lines[begin:], records[begin:]) if r.get("step", -1) <= step]
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parse(line: str) -> dict:
    """A record; {} for a line that is not a JSON object (records torn and glued together in a file written by
    plain buffered appends), which stays where it is."""
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def read_metrics(path: str) -> list[dict]:
    """Every whole record of a metrics file (headers and step records, in order)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


# ----------------------------------------------------------------------------------------------------
# progress bar and plots
# ----------------------------------------------------------------------------------------------------


def progress_fields(metrics: dict) -> dict:
    """Progress-bar fields besides the loss: preference accuracy for pairs, else the reward margin (KTO
    steps may lack it when they hold one label only)."""
    for name, key in (("acc", "rewards/accuracies"), ("margin", "rewards/margins")):
        if key in metrics:
            return {name: f"{metrics[key]:.2f}"}
    return {}


def plot(records: list, out_dir: str):
    """One PNG per PLOTTED pair (train curve and eval points) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    for train_key, eval_key in PLOTTED:
        curves = {key: [(r["step"], r[key]) for r in records if key in r] for key in (train_key, eval_key)}
        if not any(curves.values()):
            continue  # e.g. no preference accuracy for unpaired (KTO) runs
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for (key, pts), style in zip(curves.items(), ("-", "o--")):
            if pts:
                ax.plot(*zip(*pts), style, label=key)
        ax.set_xlabel("step")
        ax.set_title(train_key)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, train_key.replace("/", "_") + ".png"), dpi=100)
        plt.close(fig)
