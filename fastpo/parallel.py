"""Process group, device mesh, FSDP2 sharding and activation checkpointing.

One process per device under `torchrun` (gloo on CPU, NCCL on CUDA); a plain `python -m fastpo.train`
is a world of one and shards nothing. Sharding follows torchtitan: activation checkpointing first,
then `fully_shard` on every decoder block, then on the root module, so that the root's all-gather
brings in the embeddings, the final norm and the LM head together.

FSDP composability: the fused head reads `lm_head.weight` inside the root module's forward
(`fastpo.trainer.Scorer` owns body + head), where FSDP2 has unsharded it; it is never read outside a
forward, so it never sees a sharded DTensor. Gradient division: losses are normalized by global
counts (pairs or tokens of the whole step, all-reduced on device), so FSDP's own division by the world
size is switched off.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device
    mesh: object | None
    """1-D `dp_shard` device mesh, 2-D (`dp_replicate`, `dp_shard`) for HSDP, or None for a world of one."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str = "auto", dp_shard: int = -1) -> World:
    """Join the process group started by torchrun (if any) and pick this rank's device. `dp_shard`: ranks the
    weights are sharded over (-1: all); fewer than the world gives HSDP, a 2-D mesh ("dp_replicate",
    "dp_shard") on which each group of `dp_shard` ranks holds a full sharded copy and gradients are
    all-reduced across the copies."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    shard = size if dp_shard == -1 else dp_shard
    if size % shard:
        raise ValueError(f"--parallel.dp_shard={dp_shard} must divide the world size {size} (or be -1: all ranks)")
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if size == 1:
        return World(0, 1, dev, None)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    if shard == size:
        mesh = init_device_mesh(dev.type, (size,), mesh_dim_names=("dp_shard",))
    else:
        mesh = init_device_mesh(dev.type, (size // shard, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    return World(rank, size, dev, mesh)


def close_world(*, barrier: bool = True):
    """Leave the process group. After a normal run every rank first waits for the others (rank 0 may still be
    writing the export or plots), so no rank tears its transport down while a peer is still using it."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def decoder_blocks(model) -> list[torch.nn.Module]:
    """The repeated decoder layers of a transformers causal LM (`model.model.layers` and kin)."""
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return list(blocks)
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} (looked for layers/h/blocks)")


def apply_activation_checkpointing(model):
    """Recompute each decoder block in backward (transformers' non-reentrant checkpointing)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def mixed_precision(param_dtype: str, reduce_dtype: str) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=getattr(torch, reduce_dtype))


def apply_fsdp(root: torch.nn.Module, blocks, world: World, *, mp: MixedPrecisionPolicy | None,
               reshard_after_forward: str = "default"):
    """`fully_shard` every block, then `root` (which owns the rest: embeddings, final norm, LM head)."""
    match reshard_after_forward:
        case "default" | "always":
            reshard_blocks = True
        case "never":
            reshard_blocks = False
        case _:
            raise ValueError(f"reshard_after_forward must be default|always|never, got {reshard_after_forward!r}")
    kwargs = dict(mesh=world.mesh, mp_policy=mp or MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_blocks, **kwargs)
    # the root's parameters (and so the LM head) stay gathered from forward to backward unless "always"
    fully_shard(root, reshard_after_forward=reshard_after_forward == "always", **kwargs)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # plain SUM collectives (gloo has no PREMUL_SUM; NCCL's SUM is zero-copy)
            module.set_force_sum_reduction_for_comms(True)
    return root


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, on device, no host sync (identity for a world of one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or on Linux the process's peak RSS (VmHWM, reset
    by writing 5 to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not permitted: the peak then covers the whole process


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since `reset_peak_memory`: CUDA max allocated, else this process's peak RSS (0 where unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
