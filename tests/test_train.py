"""The trainer end to end: the embedded default learns, FSDP2 on two ranks equals one process, resume
after a kill equals an uninterrupted run, the export loads in transformers, bad input fails early, and a
NaN loss stops the run with a checkpoint. Real processes (`python -m fastpo.train`, `torchrun`), real
checkpoints on disk, the bundled tiny model and data.
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

# a short run: 4 steps of 8 examples, a small held-out set, no progress bar
FAST = ["--data.batch_size", "8", "--optim.num_steps", "4", "--optim.warmup_steps", "1",
        "--data.max_eval_examples", "16", "--logging.progress_bar", "false"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _run(args, out_dir, *, nproc=1, timeout=600):
    launcher = [sys.executable, "-m", "fastpo.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "fastpo.train"]
    cmd = launcher + FAST + ["--logging.out_dir", str(out_dir), "--checkpoint.dir", str(out_dir / "ckpt")] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_embedded_default_learns(tmp_path):
    """`python -m fastpo.train` with no arguments (outputs redirected): held-out accuracy far above chance."""
    proc = subprocess.run([sys.executable, "-m", "fastpo.train"], capture_output=True, text=True, env=_env(),
                          cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = proc.stdout + proc.stderr
    line = next(ln for ln in out.splitlines() if "held-out preference accuracy" in ln)
    before, after = float(line.split("before")[1].split()[0]), float(line.split("after")[1].split()[0])
    assert after >= 0.8 > before, line
    records = [json.loads(x) for x in open(tmp_path / "outputs" / "metrics.jsonl")]
    assert records[-1]["eval/rewards/margins"] > records[0]["eval/rewards/margins"]


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2) gives the one-process losses on the same global batch."""
    _run([], tmp_path / "one")
    _run([], tmp_path / "two", nproc=2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * max(1.0, abs(one[step])), (step, one[step], two[step])


@pytest.mark.slow
def test_precomputed_reference_equals_on_the_fly(tmp_path):
    """--ref.precompute scores every training example once, caches the sums on disk, and trains to the
    same losses as a reference forward per step; a second run reads the cache."""
    cache = ["--ref.precompute", "true", "--ref.cache_dir", str(tmp_path / "cache")]
    _run([], tmp_path / "live")
    _run(cache, tmp_path / "cached")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].name.startswith("ref-")
    _run(cache, tmp_path / "reread")
    live, cached, reread = (_losses(tmp_path / d) for d in ("live", "cached", "reread"))
    for step in live:
        assert abs(live[step] - cached[step]) <= 1e-6 * max(1.0, abs(live[step])), (step, live, cached)
        assert cached[step] == reread[step]


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(tmp_path):
    """Kill a run once its step-3 checkpoint is on disk; the resumed run's later losses equal the
    uninterrupted run's."""
    steps = ["--optim.num_steps", "6"]
    _run(steps, tmp_path / "full")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fastpo.train", *FAST, *steps, "--logging.out_dir", str(out),
           "--checkpoint.dir", str(out / "ckpt"), "--checkpoint.interval", "3"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = out / "ckpt" / "latest"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _run([*steps, "--checkpoint.resume", "latest"], out)
    full, resumed = _losses(tmp_path / "full"), _losses(out)
    for step in (4, 5, 6):
        assert abs(full[step] - resumed[step]) <= 1e-6 * max(1.0, abs(full[step])), (step, full, resumed)


@pytest.mark.slow
def test_export_loads_with_transformers_and_gives_same_logprobs(tmp_path):
    from transformers import AutoModelForCausalLM

    from fastpo import parallel
    from fastpo.config import parse_args
    from fastpo.logs import RunLog
    from fastpo.trainer import build, pack, run

    cfg = parse_args([*FAST, "--optim.num_steps", "2", "--logging.out_dir", str(tmp_path), "--device", "cpu"])
    world = parallel.init_world("cpu")
    trainer, tokenizer, _ = build(cfg, world)
    run(trainer, RunLog(cfg, 2, enabled=False))
    trainer.export(str(tmp_path / "export"), tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    batch = pack(trainer.eval_examples[:6], cfg)
    with torch.no_grad():
        ours = trainer.policy(batch).logp_sum
        theirs = type(trainer.policy)(loaded)(batch).logp_sum
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    assert (tmp_path / "export" / "model.safetensors").exists()
    assert (tmp_path / "export" / "tokenizer.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.name", "/nonexistent/model"], "--model.name='/nonexistent/model'"),
        (["--data.dataset", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
        (["--loss.name", "simpo", "--ref.name", "some/model"], "reference-free"),
        (["--loss.name", "dpoo"], "did you mean"),
        (["--loss.name", "kto"], "does not run unpaired"),
        (["--loss.ld_alpha", "0.5"], "LD-DPO"),
    ],
    ids=["unknown-model", "unknown-dataset", "ref-with-reference-free-loss", "unknown-loss", "kto-not-wired",
         "ld-alpha-not-wired"],
)
def test_bad_input_fails_before_training(tmp_path, args, message):
    with pytest.raises(ValueError) as info:
        train_cli.main([*FAST, "--logging.out_dir", str(tmp_path), *args])
    assert message in str(info.value)
    assert not (tmp_path / "metrics.jsonl").exists() or "loss" not in (tmp_path / "metrics.jsonl").read_text()


def test_nan_loss_stops_with_checkpoint(tmp_path, monkeypatch):
    import fastpo.trainer as trainer_mod

    real = trainer_mod.preference_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        return out._replace(losses=out.losses * float("nan")) if calls["n"] > 3 else out

    monkeypatch.setattr(trainer_mod, "preference_loss", poisoned)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(FloatingPointError, match="loss is nan at step"):
        train_cli.main([*FAST, "--logging.out_dir", str(tmp_path), "--checkpoint.dir", str(ckpt),
                        "--data.max_eval_examples", "8", "--device", "cpu"])
    assert any(p.name.startswith("nan-step-") for p in ckpt.iterdir())
