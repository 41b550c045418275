"""`python -m fastpo.train [--section.field value ...] [--config file.toml]`.

With no arguments: DPO on the bundled tiny model and preference data, on CPU or one GPU; the trained model is
saved to outputs/final. Under `torchrun --nproc_per_node N` the policy (and the reference) are sharded with
FSDP2. Bad input fails before the model is built, with one line naming the flag (exit status 2).
"""

from __future__ import annotations

import logging
import os
import sys

from fastpo import checkpoint as ckpt
from fastpo import parallel, preflight
from fastpo.config import parse_args, to_dict, validate
from fastpo.logs import METRICS_FILE, RunLog, plots_enabled

HELD_OUT = (("preference accuracy", "eval/rewards/accuracies"), ("reward margin", "eval/rewards/margins"),
            ("kl (z0)", "eval/kl"), ("loss", "eval/loss"))


def held_out_summary(before: dict, after: dict) -> str:
    """Held-out metrics before and after training: those the run has (pairs: accuracy, margin, loss;
    unpaired KTO: margin, z0, loss)."""
    lines = [f"held-out {name:<20} before {before[key]:8.4f}   after {after[key]:8.4f}"
             for name, key in HELD_OUT if key in before and key in after]
    return "\n".join(lines) or "no held-out examples (see --data.eval_dataset / --data.eval_fraction)"


def run_totals(history: list, runtime: float, batch_size: int) -> dict:
    """HF Trainer's end-of-run figures and the mean step throughput of this run's steps."""
    steps = [r for r in history if "time/step_s" in r]
    n = max(len(steps), 1)
    return {
        "train_runtime": runtime, "train_samples_per_second": len(steps) * batch_size / max(runtime, 1e-9),
        "train_steps_per_second": len(steps) / max(runtime, 1e-9),
        "time/step_s": sum(r["time/step_s"] for r in steps) / n,
        "throughput/tokens_per_s": sum(r["throughput/tokens_per_s"] for r in steps) / n,
        "memory/peak_gib": max((r["memory/peak_gib"] for r in steps), default=0.0),
    }


def throughput_summary(totals: dict) -> str:
    return (f"train_runtime {totals['train_runtime']:.1f} s, {totals['train_steps_per_second']:.2f} steps/s, "
            f"{totals['train_samples_per_second']:.1f} samples/s; mean step {totals['time/step_s']:.3f} s, "
            f"{totals['throughput/tokens_per_s']:.0f} tokens/s; peak memory {totals['memory/peak_gib']:.2f} GiB")


def outputs_summary(cfg, exported: str | None) -> str:
    """Where the run's outputs are."""
    out = cfg.logging.out_dir
    where = {"model": exported or "not exported (--checkpoint.export_dir none)",
             "metrics": os.path.join(out, METRICS_FILE) if cfg.logging.jsonl else "off (--logging.jsonl false)",
             "plots": os.path.join(out, "plots") if plots_enabled(cfg.logging) else "off",
             "checkpoints": cfg.checkpoint.dir,
             "tensorboard": os.path.join(out, "tensorboard") if cfg.logging.tensorboard else "off"}
    return "outputs:\n" + "\n".join(f"  {k:<12} {v}" for k, v in where.items())


def model_card(cfg, report, steps: int, metrics: dict) -> str:
    """A short README for the exported model: objective, data, steps, final metrics."""
    lines = [f"# {os.path.basename(os.path.normpath(cfg.model.name))} trained with fastpo", "",
             f"- objective: {cfg.loss.losses()} (beta {cfg.loss.beta})",
             f"- base model: {cfg.model.name}" + (f" with LoRA r={cfg.lora.r}" if cfg.lora.enabled else ""),
             f"- data: {cfg.data.dataset} ({report})", f"- steps: {steps} of {cfg.data.batch_size} examples",
             "", "Final held-out metrics:", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, float)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Parse, check, build, train, export. Raises ValueError on bad input (the CLI prints it in one line)."""
    from fastpo.build import build
    from fastpo.trainer import resolve_resume, run

    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    validate(cfg)
    preflight.check_run(cfg)
    world = parallel.init_world(cfg.device, cfg.parallel.dp_shard)
    log, finished = None, False
    try:
        trainer, tokenizer, report = build(cfg, world)
        resume = resolve_resume(cfg)
        changes = trainer.resume(resume) if resume else []
        if cfg.ref.precompute:
            trainer.precompute_reference(trainer.train_examples)
        log = RunLog(cfg, trainer.num_steps, enabled=world.is_main, initial_step=trainer.state.step,
                     config_hash=ckpt.config_hash(to_dict(cfg)), resumed_from=trainer.state.step if resume else None)
        log.message(str(report))
        for change in changes:
            log.message(f"resumed from {resume} with a changed option (--checkpoint.allow_changes): {change}")
        log.message(f"world {world.size} x {world.device.type}; {trainer.num_steps} steps of "
                    f"{cfg.data.batch_size} examples; loss {cfg.loss.losses()}")
        result = run(trainer, log)
        totals = run_totals(trainer.state.history, result.train_runtime, cfg.data.batch_size)
        if result.stopped:
            finished = True
            return {"config": to_dict(cfg), "stopped": True, "history": trainer.state.history}
        log.log(trainer.state.step, {k: v for k, v in totals.items() if k.startswith("train_")})
        exported = None
        if cfg.export_path:
            card = model_card(cfg, report, trainer.state.step, result.after)
            exported = trainer.export(cfg.export_path, tokenizer, card)
        log.message(held_out_summary(result.before, result.after))
        log.message(throughput_summary(totals))
        log.message(outputs_summary(cfg, exported))
        finished = True
        return {"config": to_dict(cfg), "before": result.before, "after": result.after, **totals,
                "history": trainer.state.history}
    finally:
        if log is not None:
            log.close(trainer.state.history)
        # after an error a rank must not wait at a barrier its failed peers will never reach
        parallel.close_world(barrier=finished)


def cli(argv: list[str] | None = None) -> int:
    """`main` for the command line: bad input (ValueError, including unusable checkpoints) is one line on
    stderr and exit status 2, a diverged run (DivergenceError) one line and status 1; no traceback."""
    from fastpo.trainer import DivergenceError

    try:
        main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DivergenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
