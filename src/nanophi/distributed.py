"""Data-parallel training across processes: DDP by default, FSDP2 (`--parallel fsdp`) for models too big for one
device. The model code knows nothing of this; the trainer calls these helpers.

    torchrun --nproc_per_node 2 -m nanophi train --data book.txt            # one machine, 2 processes
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m nanophi train ...                        # two machines

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init` reads them (env://) and picks
NCCL on GPUs, gloo on CPUs. Without them (a plain `nanophi train`) everything here is a no-op for one process.

How the pieces fit (see Trainer):
- every rank builds the same model from the same seed; DDP also broadcasts rank 0's weights at wrap time;
- the batch sampler draws the *global* batch (batch_size x world_size rows) from one shared seed and each rank
  keeps its slice, so N processes at --batch-size B train exactly like one process at --batch-size N*B;
- gradients are averaged by DDP's all-reduce, once per optimizer step (`no_sync` on the other micro-batches);
- rank 0 alone logs, evaluates (DDP) and writes checkpoints; per-rank RNG states are gathered into them.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist

from nanophi.errors import UserError

log = logging.getLogger(__name__)

INIT_TIMEOUT = datetime.timedelta(minutes=10)  # long enough for rank 0 to tokenize a corpus first


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_from_os() -> DistEnv:
    """The process's place in a torchrun launch, from its environment variables (one process without them)."""
    try:
        return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                       int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError:
        raise UserError("RANK, LOCAL_RANK and WORLD_SIZE must be integers; launch with torchrun") from None


def init(device_type: str) -> DistEnv:
    """Join the process group torchrun set up (NCCL on CUDA, gloo otherwise); a no-op for one process.
    On CUDA each process is pinned to GPU LOCAL_RANK, so plain `cuda` tensors land on its own GPU."""
    env = env_from_os()
    if not env.enabled or dist.is_initialized():
        return env
    if device_type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                            "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=INIT_TIMEOUT)
    log.info(f"rank {env.rank}/{env.world_size} joined the {backend} process group")
    return env


def shutdown() -> None:
    """Leave the process group after a run that finished on every rank.

    The barrier first: rank 0 still writes the last checkpoint when the others are done, and a gloo rank that
    destroys its group while a peer is still connected can abort at exit ("terminate called without an active
    exception", seen once in a fresh-clone test run).
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """DDP around `model`, or FSDP2 sharding applied in place (each block, then the root: parameters are
    all-gathered one block at a time in forward and backward)."""
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        inner = getattr(model, "_orig_mod", model)  # shard the module, whether or not it was compiled
        for block in inner.transformer.h:
            fully_shard(block)
        fully_shard(inner)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # init() pinned this process to its GPU, so the current device is the one its replica lives on
    return DDP(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 has none: it shards the module in place)."""
    return getattr(model, "module", model)


def no_sync(model: torch.nn.Module, skip: bool) -> ContextManager:
    """Skip the gradient all-reduce for this backward (all micro-batches but the last of a step)."""
    if not skip or not dist.is_initialized():
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only on the last micro-batch
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: Any):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def all_reduce_mean(value: float, device: torch.device) -> float:
    """The mean of a Python number over all ranks (the logged loss of a step is the global batch's)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (eval metrics, stop decisions)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, as a list on rank 0 (None elsewhere); [obj] for one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def is_sharded(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


class FullStateDict:
    """Stands in for an FSDP-sharded model where a full `state_dict()` is wanted (checkpoint.save): the
    shards are gathered (a collective: every rank calls this) and land, unsharded, on rank 0's CPU."""

    def __init__(self, model: torch.nn.Module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if getattr(model.config, "tie_embeddings", False):
            self.full.pop("lm_head.weight", None)  # the tied head is the embedding, stored once

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.full


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An FSDP optimizer's state, unsharded and keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Shard a full optimizer state (from `full_optimizer_state`) back onto this rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def load_full_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) weights into an FSDP-sharded model; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # strict=False: a tied head is stored once, under the embedding's name, and is the same parameter
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def to_float(t: torch.Tensor) -> float:
    """A scalar tensor's value; a DTensor (FSDP's gradient norm) is reduced across ranks first."""
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).item()


def check_config(tc: Any) -> None:
    """Combinations the data-parallel paths do not support, as errors that say what to use instead."""
    if tc.parallel == "fsdp" and tc.optimizer == "muon":
        raise UserError("--optimizer muon needs whole matrices and FSDP shards them; use --parallel ddp with muon "
                        "or --optimizer adamw with fsdp")


def reshard(model: torch.nn.Module) -> None:
    """Free FSDP's unsharded parameters (after a forward with no backward, such as evaluation)."""
    for m in model.modules():
        if hasattr(m, "reshard") and hasattr(m, "unshard"):
            m.reshard()
