"""Training checkpoints that are verified before a resume and never make a poisoned state a resume point.

Layout of a checkpoint root (--checkpoint.dir):

    step-0000300/           a resume point: the files of torch.distributed.checkpoint (DCP) and manifest.json
    nan-dump-step-0000412/  a diagnostic dump: the same files, `"resume_point": false` in its manifest
    latest                  one line: the folder name of the newest resume point

A save commits in three ordered steps; the last two replace a file atomically (temporary file, fsync,
os.replace):
1. every rank writes its DCP shards (rank 0 also the DCP `.metadata`);
2. rank 0 writes manifest.json: step, config and config hash, and the size and CRC-32 of every file;
3. rank 0 points `latest` at the new folder.
A crash before 2 leaves a folder without a manifest, which is never resumed from; a crash before 3 leaves
`latest` at the previous checkpoint. CRC-32 (zlib) runs at disk speed and catches truncation, torn writes and
flipped bytes; it is no defense against deliberate tampering, which a training checkpoint does not need.

Collectives: `save`, `save_diagnostic`, `verify` (with checksums), `find_resume` and `load` are collective
when a process group is initialized: every rank calls them, each rank checksums a share of the files, rank 0
decides which checkpoint to use, and every rank raises the same `CheckpointError`. `prune` runs on rank 0.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
import zlib
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from fastpo.preflight import existing_parent

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_CHUNK_BYTES = 16 << 20
_STEP_TAG = re.compile(r"step-(\d+)")

# Options that do not change the training trajectory, excluded from `config_hash` and `check_resume_config`
# (a key names a whole section or one "section.field"). Every other option, including sections added later,
# defines the run.
NOT_RUN_DEFINING = {
    "logging": "where and how often metrics are written and evaluations run; an evaluation takes no update",
    "checkpoint": "where, how often and how many checkpoints are kept, what to resume from, the export folder",
    "data.num_workers": "tokenization processes: the same tokens",
    "ref.cache_dir": "where precomputed reference log-probs live; the cache is keyed by its content",
    "model.activation_checkpointing": "recomputation to save memory: the same math",
    "model.compile": "compilation of the same math",
    "parallel.reshard_after_forward": "when FSDP frees gathered weights: the same math",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved, verified or resumed from; the message names its path and the cause."""


def step_tag(step: int) -> str:
    """Folder name of the resume point of `step`."""
    return f"step-{step:07d}"


# ----------------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------------


def save(state: dict, root: str, tag: str, *, step: int, config: dict, is_main: bool,
         resume_point: bool = True) -> str:
    """DCP-save `state` to `<root>/<tag>`, then write its manifest, then point `latest` at it; returns the path.

    A resume point must hold finite floats only: a non-finite one raises before anything is written (save it
    with `save_diagnostic` instead). A failed write (a full disk, no permission, a short write) raises one
    `CheckpointError` naming the path, the cause and the checkpoint `latest` still names, and the partial
    folder is removed.
    """
    _check_tag(tag, root)
    path = os.path.join(root, tag)
    previous = _broadcast(_read_latest(root) if is_main else None)
    still = f"`latest` still names {previous}" if previous else "there is no earlier checkpoint"
    if resume_point:
        _check_finite(state, path, still)
    cannot_replace = _broadcast(_replace_error(path) if is_main else None)
    if cannot_replace:
        raise CheckpointError(f"checkpoint {path}: cannot replace the existing folder ({cannot_replace}); {still}")
    error = None
    try:
        written = _dcp(dcp.save, state, path)
        if is_main:
            _check_written(path, written)
        files = _digests(path, _broadcast(_listing(path) if is_main else None))
        if is_main:
            _write_manifest(path, tag, step=step, config=config, files=files, resume_point=resume_point)
            if resume_point:
                _atomic_write(os.path.join(root, LATEST), tag + "\n")
    except (OSError, RuntimeError, CheckpointException) as e:
        error = _describe(e, root)
    errors = [e for e in _gather(error) if e]
    if errors:
        if is_main:
            shutil.rmtree(path, ignore_errors=True)
        raise CheckpointError(f"checkpoint {path}: save failed ({errors[0]}); removed the partial folder; {still}")
    return path


def save_diagnostic(state: dict, root: str, *, step: int, config: dict, is_main: bool, reason: str = "nan") -> str:
    """A dump of a state that must not be resumed from (e.g. non-finite after a divergence), for inspection:
    `<root>/<reason>-dump-step-NNNNNNN`, `"resume_point": false` in its manifest; `latest` is not touched and
    `find_resume` never picks it."""
    tag = f"{reason}-dump-{step_tag(step)}"
    return save(state, root, tag, step=step, config=config, is_main=is_main, resume_point=False)


def _check_tag(tag: str, root: str) -> None:
    if not tag or os.sep in tag or tag in (".", "..", LATEST) or tag.startswith("."):
        raise ValueError(f"checkpoint tag: expected a plain folder name under {root}, got {tag!r}")


def _check_finite(state: dict, path: str, still: str) -> None:
    """Raise when any rank's state holds NaN or inf: such a state must never become a resume point."""
    bad = [key for key in _gather(_first_nonfinite(state)) if key]
    if bad:
        raise CheckpointError(f"checkpoint {path}: not saved as a resume point, {bad[0]} holds NaN or inf "
                              f"(save it with save_diagnostic); {still}")


def _replace_error(path: str) -> str | None:
    """Remove an earlier folder of the same name (a save that never finished, or a step saved again); the
    OS error as text, else None."""
    try:
        _remove(path)
    except OSError as e:
        return f"{e.strerror} [{errno.errorcode.get(e.errno, e.errno)}]"
    return None


def _first_nonfinite(state: dict) -> str | None:
    """The first key of `state` whose float tensor (this rank's shard) holds NaN or inf, else None. One
    aminmax per tensor (no tensor-sized temporaries) and one host sync per device."""
    by_device = defaultdict(list)
    for key, t in _tensors(state):
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and t.numel():
            by_device[t.device].append((key, t))
    for items in by_device.values():
        finite = torch.stack([torch.isfinite(torch.stack(torch.aminmax(t.detach()))).all() for _, t in items])
        if not bool(finite.all()):
            return items[int(torch.argmin(finite.int()))][0]
    return None


def _tensors(tree, prefix: str = ""):
    """(dotted key, tensor) of every tensor in nested dicts and lists."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}.{i}")


def _check_written(path: str, metadata) -> None:
    """Every file is as long as DCP's record of it and `.metadata` unpickles, before a manifest certifies
    them: catches a `.metadata` or a file cut short without an error. (DCP takes the lengths of torch.save
    records from the stream position, so a record that is short inside a data file is not caught here.) A
    stat per file and one small read."""
    ends = defaultdict(int)
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends[info.relative_path], info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = os.path.getsize(os.path.join(path, name))
        if size < end:
            raise RuntimeError(f"{name} has {size} bytes, DCP wrote {end} (a short write)")
    try:
        dcp.FileSystemReader(path).read_metadata()
    except Exception as e:
        raise RuntimeError(f".metadata does not read back ({type(e).__name__}: {e})") from e


def _listing(path: str) -> list[str]:
    """The files DCP wrote into `path` (leftover temporary files excluded)."""
    return sorted(n for n in os.listdir(path) if n != MANIFEST and ".tmp" not in n)


def _write_manifest(path: str, tag: str, *, step: int, config: dict, files: dict, resume_point: bool) -> None:
    from fastpo import __version__

    manifest = {
        "format": FORMAT_VERSION, "tag": tag, "step": step, "resume_point": resume_point,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fastpo_version": __version__, "config_hash": config_hash(config), "config": _plain(config),
        "checksum": "crc32", "files": files,
    }
    _atomic_write(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1) + "\n")


def _describe(e: BaseException, root: str) -> str:
    """The root cause of a failed write as one phrase: DCP wraps each rank's exception in CheckpointException;
    a short write surfaces from torch's zip writer as RuntimeError('unexpected pos ...')."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, failure = next(iter(sorted(e.failures.items())))
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {_describe(inner, root)}"
    if isinstance(e, OSError) and e.errno is not None:
        where = f" writing {e.filename}" if e.filename else ""
        text = f"{e.strerror} [{errno.errorcode.get(e.errno, e.errno)}]{where}"
        return text if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else text + _free_space(root)
    return f"{type(e).__name__}: {e}{_free_space(root)}"


def _free_space(root: str) -> str:
    try:
        free = shutil.disk_usage(existing_parent(root)).free
    except OSError:
        return ""
    return f"; {free / 2**30:.2f} GiB free on the disk of {root}"


# ----------------------------------------------------------------------------------------------------
# verify, find, load, prune
# ----------------------------------------------------------------------------------------------------


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint folder `path`; CheckpointError when it is absent (an incomplete save) or
    unreadable."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: no such folder")
    try:
        with open(file) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no {MANIFEST}, an incomplete save") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        got = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has format {got!r}, expected {FORMAT_VERSION}")
    return manifest


def verify(path: str, *, checksums: bool = True) -> None:
    """Raise CheckpointError naming what is wrong with checkpoint `path`: no manifest (an incomplete save),
    a missing file, a size or a checksum that differs from the manifest. `checksums=False` checks sizes only
    (a stat per file, no reading)."""
    manifest = read_manifest(path)
    files = manifest["files"]
    for name, expected in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path}: missing file {name}")
        size = os.path.getsize(file)
        if size != expected["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, the manifest says "
                                  f"{expected['size']} (truncated or overwritten)")
    if not checksums:
        return
    found = _digests(path, sorted(files))
    for name in sorted(files):
        if "error" in found[name]:
            raise CheckpointError(f"checkpoint {path}: cannot read {name} ({found[name]['error']})")
        if found[name] != files[name]:
            raise CheckpointError(f"checkpoint {path}: checksum mismatch in {name} (crc32 {found[name]['crc32']}, "
                                  f"manifest {files[name]['crc32']}): its bytes changed after the save")


def find_resume(root: str, requested: str) -> str | None:
    """The checkpoint to resume from. `requested` is a folder (as given, or under `root`) or "latest".

    "latest": the checkpoint `latest` names if intact, else the newest intact resume point (by its manifest's
    step), with a warning naming each damaged one and why. None, after one warning line "no checkpoint to
    resume under <root>", when `root` holds no complete resume point; CheckpointError when it holds some but
    none is intact (starting over would silently discard the run). An explicit folder that is damaged or a
    diagnostic dump is an error: there is no fallback from a checkpoint asked for by name.
    """
    if requested != "latest":
        under_root = os.path.join(root, requested)
        path = under_root if not os.path.isdir(requested) and os.path.isdir(under_root) else requested
        _verify_resume_point(path)
        return path
    candidates = _broadcast(_candidates(root) if _rank() == 0 else None)
    damaged = []
    for tag, _ in candidates:
        try:
            _verify_resume_point(os.path.join(root, tag))
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        for why in damaged:
            _warn(f"{why}; resuming from {os.path.join(root, tag)} instead")
        _warn_incomplete(root, after=read_manifest(os.path.join(root, tag))["step"])
        return os.path.join(root, tag)
    if any(complete for _, complete in candidates):
        raise CheckpointError(f"--checkpoint.resume latest: no intact checkpoint under {root} "
                              f"({'; '.join(damaged)}); move the damaged ones away to start over")
    why = f" ({'; '.join(damaged)})" if damaged else ""
    _warn(f"no checkpoint to resume under {root}{why}; starting from step 0")
    return None


def _warn_incomplete(root: str, after: int) -> None:
    """Say why a newer `step-*` folder is passed over: its save never finished."""
    for step, tag in sorted(_incomplete(root)):
        if step > after:
            _warn(f"checkpoint {os.path.join(root, tag)}: no {MANIFEST}, an incomplete save; passed over")


def _verify_resume_point(path: str) -> None:
    verify(path)
    if not read_manifest(path)["resume_point"]:
        raise CheckpointError(f"checkpoint {path}: a diagnostic dump (its state may be non-finite), not a resume point")


def load(state: dict, path: str, *, verified: bool = False) -> dict:
    """Verify checkpoint `path` (skipped with `verified=True`, e.g. for a path from `find_resume`), then load
    it into `state` in place with DCP; returns its manifest."""
    if not verified:
        verify(path)
    try:
        _dcp(dcp.load, state, path)
    except (RuntimeError, KeyError, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {path}: cannot load it into this run ({_describe(e, path)})") from e
    return read_manifest(path)


def prune(root: str, keep: int) -> list[str]:
    """Keep the newest `keep` intact resume points under `root` (intact by file sizes; a damaged one does not
    count) and the one `latest` names; delete the other resume points and the incomplete `step-*` folders
    older than the newest kept. Diagnostic dumps stay. keep=0 keeps everything. Call on rank 0 only; returns
    the removed paths."""
    if keep <= 0:
        return []
    latest = _read_latest(root)
    points = _resume_points(root)
    intact = [tag for _, tag in points if _intact(os.path.join(root, tag))]
    kept = set(intact[:keep]) | ({latest} if latest else set())
    newest = max((step for step, tag in points if tag in kept), default=-1)
    doomed = [tag for _, tag in points if tag not in kept]
    doomed += [tag for step, tag in _incomplete(root) if step < newest and tag != latest]
    for tag in doomed:
        _remove(os.path.join(root, tag))
    return [os.path.join(root, tag) for tag in doomed]


def _intact(path: str) -> bool:
    try:
        verify(path, checksums=False)
    except CheckpointError:
        return False
    return True


def _candidates(root: str) -> list[tuple[str, bool]]:
    """(folder name, complete?) to try for "latest": the one `latest` names, then the other complete resume
    points, newest first."""
    latest = _read_latest(root)
    complete = [tag for _, tag in _resume_points(root)]
    return ([(latest, latest in complete)] if latest else []) + [(tag, True) for tag in complete if tag != latest]


def _resume_points(root: str) -> list[tuple[int, str]]:
    """(step, folder name) of the complete resume points under `root` (a readable manifest that does not
    mark a diagnostic dump), newest first."""
    points = []
    for tag in _subfolders(root):
        try:
            manifest = read_manifest(os.path.join(root, tag))
        except CheckpointError:
            continue
        if manifest.get("resume_point"):
            points.append((int(manifest["step"]), tag))
    return sorted(points, reverse=True)


def _incomplete(root: str) -> list[tuple[int, str]]:
    """(step, folder name) of `step-*` folders without a manifest: saves that never finished."""
    out = []
    for tag in _subfolders(root):
        match = _STEP_TAG.fullmatch(tag)
        if match and not os.path.exists(os.path.join(root, tag, MANIFEST)):
            out.append((int(match.group(1)), tag))
    return out


def _subfolders(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]


def _read_latest(root: str) -> str | None:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return f.read().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def _remove(path: str) -> None:
    """Remove a checkpoint folder, its manifest first: a crash halfway leaves an incomplete save, never a
    complete-looking folder with missing files."""
    if not os.path.isdir(path):
        return
    try:
        os.remove(os.path.join(path, MANIFEST))
    except FileNotFoundError:
        pass
    shutil.rmtree(path)


def _warn(text: str) -> None:
    if _rank() == 0:
        logger.warning(text)


# ----------------------------------------------------------------------------------------------------
# run-defining config
# ----------------------------------------------------------------------------------------------------


def config_hash(config: dict) -> str:
    """16 hex digits of SHA-256 over the run-defining options (all but `NOT_RUN_DEFINING`)."""
    text = json.dumps(_run_defining(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_changes(old: dict, new: dict) -> list[str]:
    """The run-defining options that differ, as CLI lines: `--optim.lr: 0.001 -> 0.002`."""
    a, b = _run_defining(old), _run_defining(new)
    missing = object()
    return [f"--{key}: {_show(a.get(key, missing))} -> {_show(b.get(key, missing))}"
            for key in sorted(a.keys() | b.keys()) if a.get(key, missing) != b.get(key, missing)]


def check_resume_config(manifest_config: dict, current_config: dict, allow_changes: bool, *,
                        path: str = "the checkpoint") -> list[str]:
    """The changes of run-defining options since the checkpoint; CheckpointError listing them unless
    `allow_changes` (--checkpoint.allow_changes), in which case the caller logs them."""
    changes = config_changes(manifest_config, current_config)
    if changes and not allow_changes:
        raise CheckpointError(f"--checkpoint.resume {path}: this run differs from the checkpoint's in "
                              f"{'; '.join(changes)}; rerun with the checkpoint's options, or pass "
                              "--checkpoint.allow_changes to resume with these")
    return changes


def _run_defining(config: dict) -> dict:
    return {key: value for key, value in _flatten(_plain(config)).items()
            if key not in NOT_RUN_DEFINING and key.split(".")[0] not in NOT_RUN_DEFINING}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def _plain(config: dict) -> dict:
    """The config as JSON data (tuples become lists), so a manifest's config compares equal to the live one."""
    return json.loads(json.dumps(config, default=str))


def _show(value) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(_show, value))
    if not isinstance(value, (str, int, float)):
        return "(absent)"
    return str(value)


# ----------------------------------------------------------------------------------------------------
# files and collectives
# ----------------------------------------------------------------------------------------------------


def _atomic_write(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync and os.replace: readers see the old or the new
    content, never a mix."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # the rename is done; a directory fsync is not supported everywhere


def _file_digest(file: str) -> dict:
    try:
        crc, size = 0, 0
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    except OSError as e:
        return {"error": f"{e.strerror}"}
    return {"size": size, "crc32": f"{crc:08x}"}


def _digests(folder: str, names: list[str]) -> dict[str, dict]:
    """{name: {size, crc32}} of files in `folder`; rank r reads names[r::world] and the results are gathered."""
    rank, world = _rank(), _world()
    mine = {name: _file_digest(os.path.join(folder, name)) for name in names[rank::world]}
    out = {}
    for part in _gather(mine):
        out.update(part)
    return out


def _dcp(fn, state: dict, path: str):
    """dcp.save or dcp.load, without its warning that a single process saves alone (that is intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        return fn(state, checkpoint_id=path, no_dist=not _distributed())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _gather(obj) -> list:
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
