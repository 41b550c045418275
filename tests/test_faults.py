"""Fault drills of `python -m fastpo.train`, with real processes, signals and checkpoints on disk: a diverging
run never leaves a poisoned resume point, SIGTERM checkpoints within a step and the resumed run logs every step
once and equals the uninterrupted one, a corrupt newest checkpoint falls back to the previous one, a changed
run is refused on resume, a full disk and bad input fail fast with one line.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastpo import train as train_cli

FAST = ["--data.batch_size", "8", "--optim.num_steps", "4", "--optim.warmup_steps", "1",
        "--data.max_eval_examples", "16", "--logging.progress_bar", "false", "--logging.plots", "false",
        "--checkpoint.export_dir", "none"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cmd(out, args):
    return [sys.executable, "-m", "fastpo.train", *FAST, "--logging.out_dir", str(out),
            "--checkpoint.dir", str(out / "ckpt"), *args]


def _run(out, args, *, expect=0):
    proc = subprocess.run(_cmd(out, args), capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def _records(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _step_losses(out):
    return {r["step"]: r["loss"] for r in _records(out) if "loss" in r and "step" in r}


def _load_checkpoint(path):
    """A DCP checkpoint's tensors as one flat dict (read back through torch.save's format)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = path.parent / (path.name + ".pt")
    dcp_to_torch_save(str(path), str(flat))
    state = torch.load(flat, weights_only=False)
    tensors = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                tensors[prefix + k] = v

    walk(state, "")
    return tensors


def _latest(out):
    return out / "ckpt" / (out / "ckpt" / "latest").read_text().strip()


# ----------------------------------------------------------------------------------------------------
# divergence
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_diverging_run_skips_updates_and_keeps_latest_finite(tmp_path):
    """--optim.lr 1e8: after step 1 the gradients are non-finite; those updates are skipped (counted), the
    run stops after --optim.max_skipped_steps + 1 in a row with a one-line error and a dump that is not a
    resume point, and `latest` names a checkpoint whose every tensor is finite, from which a resume works."""
    out = tmp_path / "run"
    proc = _run(out, ["--optim.lr", "1e8", "--optim.num_steps", "8", "--checkpoint.interval", "1",
                      "--optim.max_skipped_steps", "2"], expect=1)
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "consecutive steps with a non-finite" in error[0], proc.stderr[-2000:]
    steps = [r for r in _records(out) if "skipped" in r]
    assert [r["skipped"] for r in steps][-3:] == [1.0, 1.0, 1.0] and steps[-1]["skipped_steps"] >= 3
    dumps = [p for p in (out / "ckpt").iterdir() if p.name.startswith("divergence-dump-")]
    assert len(dumps) == 1 and "dump" not in (out / "ckpt" / "latest").read_text()
    tensors = _load_checkpoint(_latest(out))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    with pytest.raises(ValueError, match="diagnostic dump"):
        from fastpo.checkpoint import find_resume

        find_resume(str(out / "ckpt"), dumps[0].name)


@pytest.mark.slow
def test_injected_nan_skips_one_update_and_training_goes_on(tmp_path, monkeypatch):
    """A NaN loss at step 2 only: its update is skipped and logged, the next steps train normally."""
    import fastpo.trainer as trainer_mod

    real = trainer_mod.Scorer.forward
    calls = {"n": 0}

    def poisoned(self, batch, objective=None, **kw):
        out = real(self, batch, objective, **kw)
        if objective is not None and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 2:
                return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(trainer_mod.Scorer, "forward", poisoned)
    result = train_cli.main([*FAST, "--logging.out_dir", str(tmp_path), "--checkpoint.dir", str(tmp_path / "ckpt"),
                             "--device", "cpu"])
    skipped = [r["skipped"] for r in result["history"]]
    assert skipped == [0.0, 1.0, 0.0, 0.0] and result["history"][-1]["skipped_steps"] == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for i, r in enumerate(result["history"]) if i != 1)


# ----------------------------------------------------------------------------------------------------
# preemption
# ----------------------------------------------------------------------------------------------------


def _wait_for_step(out, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and any(r.get("step", 0) >= step and "loss" in r for r in _records(out)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in time: {proc.stderr.read() if proc.poll() is not None else ''}")


@pytest.mark.slow
def test_sigterm_checkpoints_within_a_step_and_resume_logs_each_step_once(tmp_path):
    """SIGTERM mid-run: the step in progress finishes, a checkpoint is written, the process exits 0 saying how
    to resume; the resumed run's losses equal an uninterrupted run's and metrics.jsonl holds every step once,
    under two run headers. (SIGINT and SLURM's SIGUSR1 take the same handler: tests/test_stopping.py.)"""
    sig = signal.SIGTERM
    steps = ["--optim.num_steps", "12"]
    _run(tmp_path / "full", steps)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(_cmd(out, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_step(out, 2, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    stopped_at = max(_step_losses(out))
    assert stopped_at < 12, "the run finished before the signal: nothing was tested"
    assert f"stopped on {signal.Signals(sig).name} after step {stopped_at}" in stdout + stderr
    assert "--checkpoint.resume latest" in stdout + stderr
    assert _latest(out).name == f"step-{stopped_at:07d}"
    _run(out, [*steps, "--checkpoint.resume", "latest"])
    full, resumed = _step_losses(tmp_path / "full"), _step_losses(out)
    logged = [r["step"] for r in _records(out) if "loss" in r and "step" in r]
    assert logged == list(range(1, 13)), logged
    assert sum("run" in r for r in _records(out)) == 2
    for step in range(1, 13):
        assert abs(full[step] - resumed[step]) <= 1e-6 * max(1.0, abs(full[step])), (step, full, resumed)


# ----------------------------------------------------------------------------------------------------
# checkpoints and resume
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """Flip bytes in the newest checkpoint's shard: resume warns, falls back to the previous intact
    checkpoint, and retrains the lost steps to the same losses."""
    out = tmp_path / "run"
    _run(out, ["--checkpoint.interval", "2"])
    first = _step_losses(out)
    shard = next(p for p in (out / "ckpt" / "step-0000004").iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = _run(out, ["--checkpoint.interval", "2", "--checkpoint.resume", "latest"])
    assert "step-0000004" in proc.stderr and "checksum" in proc.stderr and "step-0000002" in proc.stderr
    again = _step_losses(out)
    for step in (3, 4):
        assert abs(first[step] - again[step]) <= 1e-6 * max(1.0, abs(first[step])), (step, first, again)


@pytest.mark.slow
def test_resume_refuses_a_changed_run_unless_allowed(tmp_path):
    out = tmp_path / "run"
    _run(out, ["--checkpoint.interval", "2", "--optim.num_steps", "2"])
    proc = _run(out, ["--optim.num_steps", "2", "--checkpoint.resume", "latest", "--optim.lr", "0.01"], expect=2)
    assert "--optim.lr" in proc.stderr and "--checkpoint.allow_changes" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run(out, ["--optim.num_steps", "2", "--checkpoint.resume", "latest", "--optim.lr", "0.01",
                      "--checkpoint.allow_changes"])
    assert "--optim.lr: 0.003 -> 0.01" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_resume_latest_without_a_checkpoint_says_so(tmp_path):
    proc = _run(tmp_path / "run", ["--optim.num_steps", "1", "--checkpoint.resume", "latest"])
    assert "no checkpoint to resume under" in proc.stderr


def test_full_disk_at_a_checkpoint_fails_with_one_clear_error(tmp_path, monkeypatch):
    """The second checkpoint's write hits ENOSPC (mocked): the run stops with the path, the cause and the
    checkpoint `latest` still names, which is intact."""
    import errno

    import fastpo.checkpoint as ckpt

    real, calls = ckpt.dcp.save, {"n": 0}

    def full_disk(state, checkpoint_id=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, checkpoint_id=checkpoint_id, **kw)

    monkeypatch.setattr(ckpt.dcp, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError) as info:
        train_cli.main([*FAST, "--logging.out_dir", str(tmp_path), "--checkpoint.dir", str(tmp_path / "ckpt"),
                        "--checkpoint.interval", "1", "--device", "cpu"])
    message = str(info.value)
    assert "step-0000002" in message and "No space left on device" in message and "step-0000001" in message
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-0000001"
    ckpt.verify(str(tmp_path / "ckpt" / "step-0000001"))
    assert not (tmp_path / "ckpt" / "step-0000002").exists()


# ----------------------------------------------------------------------------------------------------
# bad input: one line, before anything is built
# ----------------------------------------------------------------------------------------------------


def _model_with_vocab(tmp_path, vocab_size):
    """The demo model folder with a smaller embedding than its tokenizer needs."""
    import shutil

    from fastpo.data import demo_paths

    model = tmp_path / "model"
    shutil.copytree(demo_paths().model, model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = vocab_size
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("case", ["config", "unwritable", "empty_data", "vocab"])
def test_bad_input_is_one_line_without_traceback(tmp_path, case):
    (tmp_path / "file").write_text("")
    (tmp_path / "empty.jsonl").write_text("")
    args, expected = {
        "config": (["--optim.lr", "-1"], "--optim.lr"),
        "unwritable": (["--checkpoint.dir", str(tmp_path / "file" / "ckpt")], "--checkpoint.dir"),
        "empty_data": (["--data.dataset", str(tmp_path / "empty.jsonl")], "has no rows"),
        "vocab": (["--model.name", str(_model_with_vocab(tmp_path, 40))], "embedding"),
    }[case]
    proc = subprocess.run([sys.executable, "-m", "fastpo.train", *FAST, "--logging.out_dir", str(tmp_path / "out"),
                           *args], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
