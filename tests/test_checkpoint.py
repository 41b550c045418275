"""fastpo.checkpoint on real torch.distributed.checkpoint saves: a round trip restores model, AdamW and
scheduler; damaged files (truncated, deleted, one flipped bit) are named by `verify` and skipped by
`find_resume("latest")` with a warning; an interrupted save, a non-finite state and a failed write (full disk,
no permission, a real per-file size limit) never move `latest`; prune; the run-defining config hash and the
resume check; and two gloo ranks with FSDP2-sharded state.
"""

import contextlib
import errno
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fastpo import checkpoint as ckpt
from fastpo.config import from_flat, to_dict

CONFIG = to_dict(from_flat({"optim.num_steps": 10}))


def _trained(seed: int):
    """A small MLP, AdamW after two updates (so its moments are not zero) and a LambdaLR schedule."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    for _ in range(2):
        model(torch.randn(5, 8)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def _state(model, optimizer, scheduler, step=0):
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "train": {"step": step}}


def _save(root, step, *, seed=0, config=CONFIG):
    state = _state(*_trained(seed), step)
    return ckpt.save(state, str(root), ckpt.step_tag(step), step=step, config=config, is_main=True)


def _latest(root):
    return (root / "latest").read_text().strip()


def test_round_trip_restores_model_optimizer_and_scheduler(tmp_path):
    model, optimizer, scheduler = _trained(seed=0)
    path = ckpt.save(_state(model, optimizer, scheduler, 7), str(tmp_path), "step-0000007", step=7, config=CONFIG,
                     is_main=True)
    ckpt.verify(path)
    manifest = ckpt.read_manifest(path)
    assert manifest["step"] == 7 and manifest["resume_point"] and _latest(tmp_path) == "step-0000007"
    assert manifest["config_hash"] == ckpt.config_hash(CONFIG)
    assert set(manifest["files"]) == {n for n in os.listdir(path) if n != "manifest.json"} >= {".metadata"}
    for name, info in manifest["files"].items():
        assert info["size"] == os.path.getsize(os.path.join(path, name))

    fresh_model, fresh_optimizer, fresh_scheduler = _trained(seed=1)
    state = _state(fresh_model, fresh_optimizer, fresh_scheduler)
    ckpt.load(state, path)
    set_state_dict(fresh_model, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    fresh_scheduler.load_state_dict(state["scheduler"])
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizer.state[a][key], fresh_optimizer.state[b][key], rtol=0, atol=0)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 2 and state["train"]["step"] == 7


def _truncate(file):
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)


def _flip_one_bit(file):
    with open(file, "r+b") as f:
        f.seek(os.path.getsize(file) // 2)
        byte = f.read(1)[0]
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))


# each way a file goes bad: a torn write or a disk quota (truncated), a lost shard (deleted), bit rot (a flip)
DAMAGE = {"truncated": (_truncate, "bytes, the manifest says"), "deleted": (os.remove, "missing file"),
          "flipped": (_flip_one_bit, "checksum mismatch")}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("victim", ["__0_0.distcp", ".metadata"])
def test_damaged_checkpoint_is_named_and_latest_falls_back(tmp_path, caplog, damage, victim):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    hurt, reason = DAMAGE[damage]
    hurt(os.path.join(newest, victim))
    with pytest.raises(ckpt.CheckpointError, match=f"{newest}: .*{reason}") as info:
        ckpt.verify(newest)
    assert victim in str(info.value) and "\n" not in str(info.value)
    with caplog.at_level(logging.WARNING, logger="fastpo.checkpoint"):
        assert ckpt.find_resume(str(tmp_path), "latest") == str(tmp_path / "step-0000001")
    warning, = [r.getMessage() for r in caplog.records]
    assert newest in warning and reason in warning and "resuming from" in warning
    with pytest.raises(ckpt.CheckpointError, match=reason):
        ckpt.find_resume(str(tmp_path), newest)  # asked for by name: no fallback


def test_load_refuses_a_damaged_checkpoint(tmp_path):
    path = _save(tmp_path, 1)
    _flip_one_bit(os.path.join(path, "__0_0.distcp"))
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch in __0_0.distcp"):
        ckpt.load(_state(*_trained(seed=1)), path)


def test_save_interrupted_before_the_manifest_is_ignored(tmp_path, monkeypatch, caplog):
    """Shards on disk, no manifest: `latest` still names the previous save and the half-written folder is
    never a resume point (and prune removes it once a newer save exists)."""
    _save(tmp_path, 1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ckpt, "_write_manifest", crash)
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, 2)
    assert (tmp_path / "step-0000002" / "__0_0.distcp").exists() and _latest(tmp_path) == "step-0000001"
    (tmp_path / "latest").unlink()  # even with no `latest` to follow, the scan skips the incomplete folder
    with caplog.at_level(logging.WARNING, logger="fastpo.checkpoint"):
        assert ckpt.find_resume(str(tmp_path), "latest") == str(tmp_path / "step-0000001")
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {tmp_path / 'step-0000002'}: no manifest.json, an incomplete save; passed over"]
    with pytest.raises(ckpt.CheckpointError, match="no manifest.json, an incomplete save"):
        ckpt.find_resume(str(tmp_path), "step-0000002")
    _save(tmp_path, 3)
    ckpt.prune(str(tmp_path), keep=5)
    assert not (tmp_path / "step-0000002").exists() and (tmp_path / "step-0000001").exists()


def test_non_finite_state_is_never_a_resume_point(tmp_path):
    """A NaN state is refused as a resume point before anything is written; as a diagnostic dump it lands
    beside the checkpoints, clearly named, `latest` untouched and never picked."""
    _save(tmp_path, 1)
    model, optimizer, scheduler = _trained(seed=0)
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    state = _state(model, optimizer, scheduler, 2)
    with pytest.raises(ckpt.CheckpointError, match=r"model\.2\.bias holds NaN or inf .* still names step-0000001"):
        ckpt.save(state, str(tmp_path), "step-0000002", step=2, config=CONFIG, is_main=True)
    assert not (tmp_path / "step-0000002").exists()
    dump = ckpt.save_diagnostic(state, str(tmp_path), step=2, config=CONFIG, is_main=True)
    assert os.path.basename(dump) == "nan-dump-step-0000002" and not ckpt.read_manifest(dump)["resume_point"]
    ckpt.verify(dump)
    assert _latest(tmp_path) == "step-0000001"
    assert ckpt.find_resume(str(tmp_path), "latest") == str(tmp_path / "step-0000001")
    with pytest.raises(ckpt.CheckpointError, match="diagnostic dump"):
        ckpt.find_resume(str(tmp_path), dump)
    (tmp_path / "latest").write_text("nan-dump-step-0000002\n")  # a hand-edited `latest` is not trusted either
    assert ckpt.find_resume(str(tmp_path), "latest") == str(tmp_path / "step-0000001")


def test_latest_with_nothing_to_resume(tmp_path, caplog):
    """No checkpoint: None and one warning line; checkpoints that are all damaged: an error, not a fresh start."""
    with caplog.at_level(logging.WARNING, logger="fastpo.checkpoint"):
        assert ckpt.find_resume(str(tmp_path / "absent"), "latest") is None
    assert [r.getMessage() for r in caplog.records] == [f"no checkpoint to resume under {tmp_path / 'absent'}; "
                                                        "starting from step 0"]
    path = _save(tmp_path, 1)
    _truncate(os.path.join(path, "__0_0.distcp"))
    with pytest.raises(ckpt.CheckpointError, match=r"no intact checkpoint under .*__0_0.distcp has"):
        ckpt.find_resume(str(tmp_path), "latest")


def test_prune_keeps_the_newest_and_latest(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step)
    state = _state(*_trained(seed=0))
    ckpt.save_diagnostic(state, str(tmp_path), step=9, config=CONFIG, is_main=True)
    (tmp_path / "latest").write_text("step-0000002\n")  # e.g. resumed from an older point by hand
    removed = ckpt.prune(str(tmp_path), keep=2)
    assert sorted(os.path.basename(p) for p in removed) == ["step-0000001", "step-0000003"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "nan-dump-step-0000009", "step-0000002", "step-0000004", "step-0000005"]
    assert ckpt.prune(str(tmp_path), keep=0) == []


class _FailingStream:
    """A file object that accepts `budget` bytes, then raises OSError(code) like a full or read-only disk, or
    with code None drops the rest silently (a short write nobody reported)."""

    def __init__(self, stream, budget, code):
        self.stream, self.budget, self.code = stream, budget, code

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.budget:
            self.stream.write(data[: self.budget])
            self.stream.flush()
            if self.code is not None:
                raise OSError(self.code, os.strerror(self.code))
        written = min(len(data), self.budget)
        self.budget -= written
        return self.stream.write(data[:written])

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.mark.parametrize("code, victim, cause", [
    (errno.ENOSPC, "", r"No space left on device \[ENOSPC\].*GiB free"),
    (errno.EACCES, "", r"Permission denied \[EACCES\]\)"),
    (None, ".metadata", r"RuntimeError: .metadata does not read back \(UnpicklingError.*GiB free"),
], ids=["full-disk", "no-permission", "silent-short-write"])
def test_failed_write_is_one_clear_error_and_latest_stays(tmp_path, monkeypatch, code, victim, cause):
    _save(tmp_path, 1)
    real = dcp_fs.FileSystem.create_stream

    @contextlib.contextmanager
    def failing(self, path, mode):
        with real(self, path, mode) as stream:
            hit = "w" in mode and victim in os.path.basename(path)
            yield _FailingStream(stream, 100, code) if hit else stream

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", failing)
    with pytest.raises(ckpt.CheckpointError) as info:
        _save(tmp_path, 2)
    message = str(info.value)
    assert message.startswith(f"checkpoint {tmp_path / 'step-0000002'}: save failed (")
    assert "removed the partial folder; `latest` still names step-0000001" in message and "\n" not in message
    assert re.search(cause, message), message
    assert not (tmp_path / "step-0000002").exists() and _latest(tmp_path) == "step-0000001"
    assert ckpt.find_resume(str(tmp_path), "latest") == str(tmp_path / "step-0000001")


def test_real_short_write_under_a_file_size_limit(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), as a full disk refuses them: a real
    short write, in a subprocess so that the limit stays there."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_checkpoint import _save
        from fastpo.checkpoint import CheckpointError
        _save({str(tmp_path)!r}, 1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
        try:
            _save({str(tmp_path)!r}, 2)
        except CheckpointError as e:
            print(e)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "save failed (rank 0: File too large [EFBIG]" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "`latest` still names step-0000001" in proc.stdout
    assert not (tmp_path / "step-0000002").exists() and _latest(tmp_path) == "step-0000001"


# ----------------------------------------------------------------------------------------------------
# run-defining config
# ----------------------------------------------------------------------------------------------------


def _config(**flat):
    return to_dict(from_flat({"optim.num_steps": 10, **flat}))


def test_config_hash_ignores_outputs_and_catches_the_trajectory():
    base = ckpt.config_hash(_config())
    for quiet in ({"logging.out_dir": "elsewhere", "logging.progress_bar": False, "logging.eval_interval": 5},
                  {"checkpoint.interval": 3, "checkpoint.resume": "latest", "checkpoint.keep": 2},
                  {"checkpoint.dir": "/x", "checkpoint.export_dir": "/y", "model.activation_checkpointing": True}):
        assert ckpt.config_hash(_config(**quiet)) == base, quiet
    for loud in ({"optim.lr": 0.002}, {"data.batch_size": 16}, {"seed": 1}, {"loss.beta": 0.2},
                 {"optim.betas": [0.8, 0.9]}):
        assert ckpt.config_hash(_config(**loud)) != base, loud


def test_resume_config_check_lists_changes_and_names_the_override(tmp_path):
    path = _save(tmp_path, 1, config=_config(**{"optim.lr": 0.001}))
    saved = ckpt.read_manifest(path)["config"]  # through JSON: tuples came back as lists
    assert ckpt.check_resume_config(saved, _config(**{"optim.lr": 0.001, "logging.jsonl": False}), False) == []
    changed = _config(**{"optim.lr": 0.002, "seed": 3})
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.check_resume_config(saved, changed, False, path=path)
    message = str(info.value)
    assert "--optim.lr: 0.001 -> 0.002" in message and "--seed: 0 -> 3" in message
    assert "--checkpoint.allow_changes" in message and path in message and "\n" not in message
    assert ckpt.check_resume_config(saved, changed, True) == ["--optim.lr: 0.001 -> 0.002", "--seed: 0 -> 3"]


def test_config_changes_show_cli_values():
    old = {"optim": {"betas": [0.9, 0.999], "num_steps": None}, "model": {"compile": False}}
    new = {"optim": {"betas": [0.8, 0.999], "num_steps": 5}, "model": {"compile": True}, "lora": {"r": 8}}
    assert ckpt.config_changes(old, new) == ["--lora.r: (absent) -> 8", "--optim.betas: 0.9,0.999 -> 0.8,0.999",
                                             "--optim.num_steps: none -> 5"]


def test_unusable_root_fails_with_its_path(tmp_path):
    (tmp_path / "file").write_text("")
    root = tmp_path / "file" / "ckpt"
    with pytest.raises(ckpt.CheckpointError, match=rf"^checkpoint {root}/step-0000001: save failed \(.*Not a "
                                                   r"directory.*there is no earlier checkpoint$"):
        _save(root, 1)


def test_saving_a_step_again_replaces_it(tmp_path):
    """A leftover file of an earlier save of the same step (here: another rank count's shard) is not kept."""
    path = _save(tmp_path, 1)
    (tmp_path / "step-0000001" / "__1_0.distcp").write_bytes(b"stale")
    assert _save(tmp_path, 1, seed=3) == path
    assert "__1_0.distcp" not in os.listdir(path) and "__1_0.distcp" not in ckpt.read_manifest(path)["files"]
    ckpt.verify(path)


def test_bad_tag_is_refused(tmp_path):
    with pytest.raises(ValueError, match="checkpoint tag: expected a plain folder name"):
        ckpt.save({}, str(tmp_path), "latest", step=0, config={}, is_main=True)


# ----------------------------------------------------------------------------------------------------
# two ranks: FSDP2-sharded state on gloo
# ----------------------------------------------------------------------------------------------------


def _sharded(seed, world):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    fully_shard(model, mesh=world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def _two_rank_worker(rank, init_file, root, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        model, optimizer = _sharded(0, mesh)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        for step in (1, 2):
            ckpt.save({"model": model_sd, "optim": optim_sd}, root, ckpt.step_tag(step), step=step, config=CONFIG,
                      is_main=rank == 0)
        files = sorted(ckpt.read_manifest(os.path.join(root, "step-0000002"))["files"])
        if rank == 1:
            _flip_one_bit(os.path.join(root, "step-0000002", "__1_0.distcp"))
        dist.barrier()
        try:
            ckpt.verify(os.path.join(root, "step-0000002"))
            error = None
        except ckpt.CheckpointError as e:
            error = str(e)
        found = ckpt.find_resume(root, "latest")
        fresh, fresh_optim = _sharded(1, mesh)
        state = dict(zip(("model", "optim"), get_state_dict(fresh, fresh_optim)))
        ckpt.load(state, found, verified=True)
        set_state_dict(fresh, fresh_optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        same = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), fresh.parameters()))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"files": files, "error": error, "found": found, "same": same}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_checksum_shares_and_agree(tmp_path):
    """Each rank writes its shard file and checksums a share; a flipped bit in rank 1's shard is reported
    identically on both ranks, both fall back to the same checkpoint and load it."""
    import torch.multiprocessing as mp

    root = tmp_path / "ckpt"
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "pg"), str(root), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1], results
    assert results[0]["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "checksum mismatch in __1_0.distcp" in results[0]["error"]
    assert results[0]["found"] == str(root / "step-0000001") and results[0]["same"]
