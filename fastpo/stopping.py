"""Graceful stop: on SIGTERM, SIGINT or SIGUSR1 finish the current step, save a checkpoint and exit 0.

Schedulers announce the end of a job with a signal: SLURM sends SIGTERM at the time limit or on preemption
(and SIGUSR1 ahead of it with `--signal=USR1@<seconds>`), Kubernetes sends SIGTERM before the grace period
ends, spot instances on reclaim, a terminal SIGINT on Ctrl-C. The first signal only sets a flag; the loop
reads it once per step, agreed across ranks, so every rank stops after the same step. A second signal exits
at once with status 128 + signum, as the signal's default action would, without a checkpoint.

    with GracefulStop(verbose=world.is_main) as stop:
        while trainer.state.step < trainer.num_steps:
            metrics = trainer.train_step()
            ...
            if stop.should_stop():
                path = trainer.checkpoint()
                log.message(stop.resume_message(trainer.state.step, path))
                break
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class GracefulStop:
    """Signal handlers for the duration of a run (a context manager); the previous handlers come back on exit.

    `should_stop()` costs one all-reduce of one number per call in a multi-process job. It can instead ride
    on the step's metric reduction: add `flag()` to the summed metrics and pass the reduced sum to
    `should_stop(reduced=...)`, which then communicates nothing (the sum of 0/1 flags is > 0 exactly when
    their maximum is).
    """

    def __init__(self, signals=SIGNALS, *, verbose: bool = True, device: torch.device | None = None):
        self.signals = tuple(signals)
        self.verbose = verbose
        self.device = device
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("graceful stop on %s is off: signal handlers can only be set in the main thread",
                           "/".join(signal.Signals(s).name for s in self.signals))
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """Whether this process has received a stop signal (not yet agreed with the other ranks)."""
        return self.signum is not None

    def flag(self) -> float:
        """1.0 once this process has received a stop signal, else 0.0: a summand for the step's metric reduction."""
        return float(self.requested)

    def should_stop(self, reduced: float | None = None) -> bool:
        """Whether any rank has received a stop signal: the same answer on every rank. `reduced` is `flag()`
        already summed over ranks; without it, one MAX all-reduce when a process group is initialized."""
        if reduced is not None:
            return reduced > 0
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([self.flag()], device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def resume_message(self, step: int, path: str) -> str:
        """The line to print after the stop's checkpoint is saved."""
        name = signal.Signals(self.signum).name if self.signum else "request"
        return f"stopped on {name} after step {step}; saved {path}; resume with --checkpoint.resume latest"

    def _device(self) -> torch.device:
        if self.device is not None:
            return self.device
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _handle(self, signum: int, frame) -> None:
        """Runs between two bytecodes of the main thread: only set the flag and write with os.write (no
        logging locks, no buffered streams), or exit at once on the second signal."""
        name = signal.Signals(signum).name
        if self.signum is not None:
            _stderr(f"fastpo: second stop signal ({name}): exiting now, without a checkpoint\n")
            os._exit(128 + signum)
        self.signum = signum
        if self.verbose:
            _stderr(f"fastpo: {name} received: finishing the current step, then saving a checkpoint and exiting "
                    f"(send it again to exit at once)\n")


def _stderr(text: str) -> None:
    try:
        os.write(2, text.encode())
    except OSError:
        pass
