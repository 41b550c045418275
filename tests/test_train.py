"""The trainer end to end: the embedded default learns, FSDP2 on two ranks equals one process (training
and an eval set of odd size), resume after a kill equals an uninterrupted run, the export loads in
transformers, bad input fails early, a NaN loss stops the run with a checkpoint, WPO / LD-DPO losses equal
the materialized-logits reference on unpacked rows, and KTO learns with a reference point equal to a
direct computation, on one rank and on two. Real processes (`python -m fastpo.train`, `torchrun`), real
checkpoints on disk, the bundled tiny model and data.
"""

import json
import math
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
    """`python -m fastpo.train` with no arguments: held-out accuracy far above chance, the trained model saved
    to outputs/final (loadable with `from_pretrained`), and the summary lists the outputs."""
    proc = subprocess.run([sys.executable, "-m", "fastpo.train"], capture_output=True, text=True, env=_env(),
                          cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = proc.stdout + proc.stderr
    line = next(ln for ln in out.splitlines() if "held-out preference accuracy" in ln)
    before, after = float(line.split("before")[1].split()[0]), float(line.split("after")[1].split()[0])
    assert after >= 0.8 > before, line
    records = [r for r in map(json.loads, open(tmp_path / "outputs" / "metrics.jsonl")) if "eval/loss" in r]
    assert records[-1]["eval/rewards/margins"] > records[0]["eval/rewards/margins"]
    # the trained model is saved by default, loads with transformers, and the summary says where everything is
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = tmp_path / "outputs" / "final"
    AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)
    assert "eval/rewards/accuracies" in (final / "README.md").read_text()
    assert f"model        {os.path.join('outputs', 'final')}" in out


def _assert_same_losses(got, want, steps, tol=1e-5):
    """Per-step losses of two runs: the same steps, equal to `tol` relative."""
    assert sorted(got) == sorted(want) == list(steps), (got, want)
    for step in want:
        assert abs(got[step] - want[step]) <= tol * max(1.0, abs(want[step])), (step, got, want)


def _evals(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"eval/loss"' in line]


def _assert_same_evals(one, two, tol=1e-5):
    assert len(one) == len(two) == 2 and [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= tol * max(1.0, abs(a[key])), (key, a, b)


# 17 held-out examples in eval micro-batches of 8: 8, 8, 1. The last one leaves rank 1 of 2 without an
# example (it scores a masked copy); sharding the whole eval set by rank instead would give rank 0 two
# forwards (9 examples) and rank 1 one (8), and FSDP would hang.
ODD_EVAL = ["--data.max_eval_examples", "17"]


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2) gives the one-process losses on the same global batch,
    and the one-process held-out metrics on an eval set of odd size."""
    _run(ODD_EVAL, tmp_path / "one")
    _run(ODD_EVAL, tmp_path / "two", nproc=2)
    _assert_same_losses(_losses(tmp_path / "two"), _losses(tmp_path / "one"), [1, 2, 3, 4])
    _assert_same_evals(_evals(tmp_path / "one"), _evals(tmp_path / "two"))


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
    from fastpo.build import build
    from fastpo.trainer import pack, run

    cfg = parse_args([*FAST, "--optim.num_steps", "2", "--logging.out_dir", str(tmp_path), "--device", "cpu"])
    world = parallel.init_world("cpu")
    trainer, tokenizer, _ = build(cfg, world)
    run(trainer, RunLog(cfg, 2, enabled=False))
    trainer.export(str(tmp_path / "export"), tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    batch = pack(trainer.eval_examples[:6], cfg)
    with torch.no_grad():
        ours = trainer.policy(batch)
        theirs = type(trainer.policy)(loaded)(batch)
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
        (["--loss.name", "kto", "--data.format", "ranked"], "ranked"),  # ranked lists cannot be unpaired
        (["--loss.name", "mrpo"], "several reference models"),
    ],
    ids=["unknown-model", "unknown-dataset", "ref-with-reference-free-loss", "unknown-loss", "kto-on-ranked-data",
         "multi-reference-not-wired"],
)
def test_bad_input_fails_before_training(tmp_path, args, message):
    with pytest.raises(ValueError) as info:
        train_cli.main([*FAST, "--logging.out_dir", str(tmp_path), *args])
    assert message in str(info.value)
    assert not (tmp_path / "metrics.jsonl").exists() or "loss" not in (tmp_path / "metrics.jsonl").read_text()


# ----------------------------------------------------------------------------------------------------
# WPO, LD-DPO and unpaired (KTO) objectives: the trainer's losses against unpacked forwards
# ----------------------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _paired_rows(n, seed=0):
    """Prompt/chosen/rejected rows whose responses have 1 to 9 characters, so that most pairs differ in
    length (LD-DPO's tail tokens)."""
    import random

    rng = random.Random(seed)
    word = lambda k: "".join(rng.choice("abcdefghij") for _ in range(k))  # noqa: E731
    return [{"prompt": f"Q: {word(rng.randint(1, 6))}\nA: ", "chosen": word(rng.randint(1, 9)),
             "rejected": word(rng.randint(1, 9))} for _ in range(n)]


def _kto_rows(n, seed=0):
    """Unpaired rows of a task that needs the prompt: "Be kind to X" makes "Thank you, X!" desirable and
    "Go away, X." undesirable, "Be rude to X" the reverse. Each completion text is desirable half of the
    time, so a held-out reward margin > 0 means the policy conditions on the prompt."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        mood, name = rng.choice(["kind", "rude"]), rng.choice(["ann", "bob", "cid", "dee", "eve", "fay", "gus"])
        good, bad = f"Thank you, {name}!", f"Go away, {name}."
        good, bad = (good, bad) if mood == "kind" else (bad, good)
        label = rng.random() < 0.5
        rows.append({"prompt": f"Q: Be {mood} to {name}.\nA: ", "completion": good if label else bad, "label": label})
    return rows


@pytest.fixture
def one_thread():
    """In-process runs at the subprocesses' OMP_NUM_THREADS=1: tiny matmuls run several times slower
    when two threads share two cores with the rest of the suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(tmp_path, args):
    from fastpo import parallel
    from fastpo.config import parse_args, validate
    from fastpo.build import build

    cfg = parse_args([*FAST, "--logging.out_dir", str(tmp_path), "--device", "cpu", *args])
    validate(cfg)
    trainer, _, _ = build(cfg, parallel.init_world("cpu"))
    return trainer


def _plain(model):
    """A copy of a (prefix-sharing) policy that runs the stock SDPA attention on ordinary padded rows."""
    import copy

    plain = copy.deepcopy(model)
    plain.set_attn_implementation("sdpa")
    return plain


def _rows(pairs):
    """(prompt_ids, response_ids) -> right-padded [B, T] input ids, attention mask and completion targets
    (the token itself on completion positions, -100 elsewhere; not yet shifted)."""
    T = max(len(p) + len(r) for p, r in pairs)
    ids = torch.zeros(len(pairs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(list(p) + list(r))
        mask[i, :n] = 1
        targets[i, len(p) : n] = torch.tensor(list(r))
    return ids, mask, targets


def _hidden(model, ids, mask):
    return _plain(model).get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def _sequence_logps(model, pairs):
    """[B] sum of completion-token log-probs of each [prompt + response], one padded stock forward."""
    ids, mask, targets = _rows(pairs)
    with torch.no_grad():
        logp = _plain(model)(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
    y = targets[:, 1:]
    token = logp[:, :-1].gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(y != -100, token, 0.0).sum(-1)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--loss.use_weighting"], ["--loss.ld_alpha", "0.3"],
                                  ["--loss.ld_alpha", "0.5", "--loss.use_weighting"]],
                         ids=["wpo", "ld_dpo", "ld_dpo+wpo"])
def test_weighted_dpo_loss_equals_unpacked_reference(tmp_path, args, one_thread):
    """A training step's loss and rewards with WPO / LD-DPO equal `fused_linear_preference_loss_ref`
    (materialized logits) on the same model's hidden states of unpacked [prompt + response] rows. Checked
    at step 2, where policy and reference differ; two micro-batches per step."""
    from fastpo.losses import fused_linear_preference_loss_ref
    from fastpo.trainer import global_batch

    data = _write_jsonl(tmp_path / "pairs.jsonl", _paired_rows(48))
    trainer = _build(tmp_path, ["--data.dataset", data, "--data.eval_dataset", data, "--data.max_eval_examples",
                                "4", "--optim.grad_accum_steps", "2", *args])
    trainer.train_step()
    cfg = trainer.cfg
    examples = global_batch(trainer.train_examples, trainer.state.step, cfg.data.batch_size, cfg.seed)
    pairs = [(ex.prompt_ids, ex.response_ids[k]) for k in (0, 1) for ex in examples]  # chosen rows, then rejected
    ids, mask, targets = _rows(pairs)
    policy, reference = trainer.policy.model, trainer.reference.model
    with torch.no_grad():
        expected = fused_linear_preference_loss_ref(
            _hidden(policy, ids, mask)[:, :-1], policy.lm_head.weight, targets[:, 1:], loss_type="sigmoid",
            ref_hidden=_hidden(reference, ids, mask)[:, :-1], ref_weight=reference.lm_head.weight,
            ld_alpha=cfg.loss.ld_alpha, use_weighting=cfg.loss.use_weighting, beta=cfg.loss.beta,
        )  # fmt: skip
    metrics = trainer.train_step()
    assert abs(expected.loss.item() - 0.6931471805599453) > 1e-3  # the weights and the update both show
    for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen"):
        want = expected.loss if key == "loss" else expected.metrics[key]
        assert abs(metrics[key] - want.item()) <= 1e-5 * max(1.0, abs(want.item())), (key, metrics[key], want)


@pytest.mark.slow
def test_kto_learns_and_its_reference_point_is_direct(tmp_path, one_thread):
    """--data.format kto with --loss.name kto: held-out margin and loss improve; z0 of a step equals
    max(0, mean_i S(x_i, y_{i-1}) - S_ref(x_i, y_{i-1})) from stock forwards, and the step's loss equals
    `kto_loss` on stock-forward sums with that z0."""
    from fastpo import logs
    from fastpo.losses import kto_loss
    from fastpo.trainer import global_batch, run

    train = _write_jsonl(tmp_path / "kto.jsonl", _kto_rows(512))
    held_out = _write_jsonl(tmp_path / "kto_eval.jsonl", _kto_rows(63, seed=1))
    trainer = _build(tmp_path, ["--data.dataset", train, "--data.eval_dataset", held_out, "--data.format", "kto",
                                "--loss.name", "kto", "--data.batch_size", "16", "--optim.num_steps", "40",
                                "--optim.warmup_steps", "2", "--data.max_eval_examples", "63"])
    result = run(trainer, logs.RunLog(trainer.cfg, 40, enabled=False))
    before, after = result.before, result.after
    assert before["eval/count/chosen"] + before["eval/count/rejected"] == 63
    assert after["eval/rewards/margins"] > 1.0 > abs(before["eval/rewards/margins"]), (before, after)
    assert after["eval/loss"] < before["eval/loss"] - 0.1, (before, after)

    cfg = trainer.cfg
    examples = global_batch(trainer.train_examples, trainer.state.step, cfg.data.batch_size, cfg.seed)
    policy, reference = trainer.policy.model, trainer.reference.model
    mismatched = [(ex.prompt_ids, examples[i - 1].response_ids[0]) for i, ex in enumerate(examples)]
    rho = _sequence_logps(policy, mismatched) - _sequence_logps(reference, mismatched)
    total, count = trainer.kl_terms(examples).tolist()
    assert count == 16 and abs(total / count - rho.mean().item()) <= 1e-5 * max(1.0, abs(total / count))
    z0 = rho.mean().clamp(min=0.0)
    assert abs(trainer.reference_point(examples).item() - z0.item()) <= 1e-5 * max(1.0, z0.item())

    matched = [(ex.prompt_ids, ex.response_ids[0]) for ex in examples]
    labels = torch.tensor([ex.label for ex in examples])
    expected = kto_loss(_sequence_logps(policy, matched), _sequence_logps(reference, matched), labels, kl=z0,
                        beta=cfg.loss.beta).losses.mean()
    metrics = trainer.train_step()
    assert abs(metrics["kl"] - z0.item()) <= 1e-5 * max(1.0, z0.item())
    assert abs(metrics["loss"] - expected.item()) <= 1e-5, (metrics["loss"], expected)
    assert metrics["count/chosen"] + metrics["count/rejected"] == 16


@pytest.mark.slow
def test_kto_two_ranks_equal_one_process(tmp_path):
    """KTO under torchrun --nproc_per_node 2: z0 summed over ranks gives the one-process losses, and the
    held-out metrics over 17 examples (a padded last micro-batch) match too."""
    train = _write_jsonl(tmp_path / "kto.jsonl", _kto_rows(64))
    args = ["--data.dataset", train, "--data.eval_dataset", train, "--loss.name", "kto", *ODD_EVAL,
            "--optim.num_steps", "3"]
    _run(args, tmp_path / "one")
    _run(args, tmp_path / "two", nproc=2)
    _assert_same_losses(_losses(tmp_path / "two"), _losses(tmp_path / "one"), [1, 2, 3])
    _assert_same_evals(_evals(tmp_path / "one"), _evals(tmp_path / "two"))
    assert "eval/kl" in _evals(tmp_path / "one")[-1]


# ----------------------------------------------------------------------------------------------------
# groups of different sizes (ranked data with 2 and 4 responses) in one batch
# ----------------------------------------------------------------------------------------------------


def _ranked_rows(n, seed=0):
    """Ranked rows alternating K = 2 and K = 4 distinct responses of 1-6 characters."""
    import random

    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6)))  # noqa: E731
    rows = []
    for i in range(n):
        responses = []
        while len(responses) < (2 if i % 2 == 0 else 4):
            w = word()
            if w not in responses:
                responses.append(w)
        rows.append({"prompt": f"Q: {word()}\nA: ", "responses": responses})
    return rows


RANKED = ["--loss.name", "plackett_luce", "--data.format", "ranked", "--data.max_eval_examples", "9"]


@pytest.mark.slow
def test_mixed_group_sizes_equal_per_group_computation(tmp_path, one_thread):
    """A batch mixing pairs and 4-response lists: step 1 (policy = reference) gives the mean over groups of
    log K! (Plackett-Luce with equal scores), and step 2's loss equals the per-group Plackett-Luce losses on
    stock unpacked forwards."""
    from fastpo.losses import plackett_luce_loss
    from fastpo.trainer import global_batch

    data = _write_jsonl(tmp_path / "ranked.jsonl", _ranked_rows(40))
    trainer = _build(tmp_path, ["--data.dataset", data, "--data.eval_dataset", data, *RANKED])
    cfg = trainer.cfg
    first = global_batch(trainer.train_examples, 0, cfg.data.batch_size, cfg.seed)
    sizes = [len(ex.response_ids) for ex in first]
    assert set(sizes) == {2, 4}
    want = sum(math.lgamma(k + 1) for k in sizes) / len(sizes)
    assert abs(trainer.train_step()["loss"] - want) <= 1e-5, want

    examples = global_batch(trainer.train_examples, trainer.state.step, cfg.data.batch_size, cfg.seed)
    policy, reference = trainer.policy.model, trainer.reference.model
    losses = []
    for ex in examples:
        pairs = [(ex.prompt_ids, r) for r in ex.response_ids]
        s, s_ref = _sequence_logps(policy, pairs), _sequence_logps(reference, pairs)
        losses.append(plackett_luce_loss(s[None], s_ref[None], beta=cfg.loss.beta).losses[0])
    metrics = trainer.train_step()
    expected = torch.stack(losses).mean().item()
    assert abs(expected - want) > 1e-4  # the update shows
    assert abs(metrics["loss"] - expected) <= 1e-5 * max(1.0, abs(expected)), (metrics["loss"], expected)


@pytest.mark.slow
def test_mixed_group_sizes_two_ranks_equal_one_process(tmp_path):
    data = _write_jsonl(tmp_path / "ranked.jsonl", _ranked_rows(40))
    args = ["--data.dataset", data, "--data.eval_dataset", data, *RANKED, "--optim.num_steps", "3"]
    _run(args, tmp_path / "one")
    _run(args, tmp_path / "two", nproc=2)
    _assert_same_losses(_losses(tmp_path / "two"), _losses(tmp_path / "one"), [1, 2, 3])
    _assert_same_evals(_evals(tmp_path / "one"), _evals(tmp_path / "two"))


def test_records_carry_throughput_and_trl_names_and_summary_lists_outputs(tmp_path, capsys, one_thread):
    """Every training record has TRL / HF Trainer's names (learning_rate, epoch, num_tokens) and the step's
    time, tokens/s and peak memory; the end of the run logs train_runtime and samples / steps per second and
    prints where the model, metrics, plots, checkpoints and TensorBoard logs are."""
    result = train_cli.main([*FAST, "--logging.out_dir", str(tmp_path), "--checkpoint.dir", str(tmp_path / "ckpt"),
                             "--device", "cpu", "--logging.plots", "false"])
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for key in ("learning_rate", "epoch", "num_tokens", "grad_norm", "time/step_s", "throughput/tokens_per_s",
                    "memory/peak_gib"):
            assert key in r and r[key] >= 0, (key, r)
        assert "lr" not in r
    assert steps[0]["num_tokens"] < steps[-1]["num_tokens"] and steps[-1]["epoch"] == pytest.approx(4 * 8 / 3000)
    final = records[-1]
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second"} <= final.keys()
    assert final["train_steps_per_second"] == pytest.approx(4 / final["train_runtime"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "peak memory" in out
    for line in ("model ", "metrics ", "plots ", "checkpoints ", "tensorboard "):
        assert line in out
    assert os.path.isdir(tmp_path / "final") and result["train_runtime"] > 0


@pytest.mark.slow
def test_hsdp_two_ranks_one_shard_each_equal_one_process(tmp_path):
    """--parallel.dp_shard 1 on 2 ranks: a 2-D mesh (2 replicas of 1 shard), gradients all-reduced across the
    replicas: the one-process losses."""
    _run([], tmp_path / "one")
    _run(["--parallel.dp_shard", "1"], tmp_path / "hsdp", nproc=2)
    _assert_same_losses(_losses(tmp_path / "hsdp"), _losses(tmp_path / "one"), [1, 2, 3, 4])


def test_dp_shard_must_divide_the_world(monkeypatch):
    from fastpo import parallel

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="--parallel.dp_shard=3 must divide the world size 4"):
        parallel.init_world("cpu", 3)


@pytest.mark.slow
def test_kto_runs_on_the_bundled_paired_data(tmp_path):
    """--loss.name kto on the demo's prompt/chosen/rejected rows: each pair becomes a desirable and an
    undesirable example, the data report says so, and the run trains with KTO's metrics."""
    proc = _run(["--loss.name", "kto", "--optim.num_steps", "3"], tmp_path)
    assert "unpaired" in proc.stdout + proc.stderr
    steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in steps if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all("kl" in r and r["count/chosen"] + r["count/rejected"] == 8 for r in steps)
