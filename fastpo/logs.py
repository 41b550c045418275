"""Run logging on rank 0: progress bar, JSONL metrics, TensorBoard, and PNG plots at the end."""

from __future__ import annotations

import json
import os

PLOTTED = (("loss", "eval/loss"), ("rewards/accuracies", "eval/rewards/accuracies"),
           ("rewards/margins", "eval/rewards/margins"))


class RunLog:
    """Writes metrics of every step; a no-op on ranks other than 0."""

    def __init__(self, cfg, total_steps: int, *, enabled: bool, initial_step: int = 0):
        self.cfg, self.enabled = cfg.logging, enabled
        self.records = []
        self.bar = self.jsonl = self.tb = None
        if not enabled:
            return
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        if self.cfg.jsonl:
            self.jsonl = open(os.path.join(self.cfg.out_dir, "metrics.jsonl"), "a")
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
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
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
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.cfg.plots:
            plot(history or self.records, os.path.join(self.cfg.out_dir, "plots"))


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
