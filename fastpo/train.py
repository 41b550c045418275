"""`python -m fastpo.train [--section.field value ...] [--config file.toml]`.

With no arguments: DPO on the bundled tiny model and preference data, on CPU or one GPU. Under
`torchrun --nproc_per_node N` the policy (and the reference) are sharded with FSDP2.
"""

from __future__ import annotations

import logging
import os
import sys

from fastpo import parallel
from fastpo.config import parse_args, to_dict, validate
from fastpo.logs import RunLog
from fastpo.trainer import build, resolve_resume, run


SUMMARY = (("preference accuracy", "eval/rewards/accuracies"), ("reward margin", "eval/rewards/margins"),
           ("kl (z0)", "eval/kl"), ("loss", "eval/loss"))


def summary(before: dict, after: dict) -> str:
    """Held-out metrics before and after training: those the run has (pairs: accuracy, margin, loss;
    unpaired KTO: margin, z0, loss)."""
    lines = [f"held-out {name:<20} before {before[key]:8.4f}   after {after[key]:8.4f}"
             for name, key in SUMMARY if key in before and key in after]
    return "\n".join(lines) or "no held-out examples (see --data.eval_dataset / --data.eval_fraction)"


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    validate(cfg)
    world = parallel.init_world(cfg.device)
    log = None
    try:
        trainer, tokenizer, report = build(cfg, world)
        resume = resolve_resume(cfg)
        if resume:
            trainer.resume(resume)
        if cfg.ref.precompute:
            trainer.precompute_reference(trainer.train_examples)
        log = RunLog(cfg, trainer.num_steps, enabled=world.is_main, initial_step=trainer.state.step)
        log.message(str(report))
        log.message(f"world {world.size} x {world.device.type}; {trainer.num_steps} steps of "
                    f"{cfg.data.batch_size} examples; loss {cfg.loss.losses()}")
        before, after = run(trainer, log)
        log.message(summary(before, after))
        if cfg.checkpoint.export_dir:
            trainer.export(cfg.checkpoint.export_dir, tokenizer)
        return {"config": to_dict(cfg), "before": before, "after": after, "history": trainer.state.history}
    finally:
        if log is not None:
            log.close()
        parallel.close_world()


if __name__ == "__main__":
    main(sys.argv[1:])
