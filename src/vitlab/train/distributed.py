"""Many processes, many machines: torchrun's environment → process group, device, DDP / FSDP2, collectives.

This is the only module below the CLI that reads environment variables: the ones torchrun (or `srun` through
torchrun) sets for every process — RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
Everything else asks a `Distributed` value, so the Trainer runs unchanged in one process or in many.

- Backend: nccl when the device is CUDA, gloo on the CPU.
- Device: `cuda:LOCAL_RANK` under torchrun on a CUDA machine, else what the config asked for.
- A process group that already exists (made by the caller, e.g. a test with a file:// store) is used as it is and
  left for the caller to destroy.
- Checkpoints always hold full, unwrapped state dicts (no `module.` prefixes, no shards), so a run resumes on any
  number of processes, with or without FSDP.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vitlab.errors import VitlabError
from vitlab.eval.metrics import EvalResult, evaluation_sums



@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank among `world_size` processes, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: bool = False  # a process group is in use (world_size > 1, or FSDP on one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all processes (float64, so counts stay exact)."""
        if not self.group:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def mean(self, value: float) -> float:
        """The mean of a scalar over all processes (e.g. the training loss for logging)."""
        return self.all_reduce_sum([value])[0] / self.world_size

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def launched() -> bool:
    """True in a process started by torchrun (or anything else that sets its variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def environment() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's variables; (0, 1, 0, 1) without them."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise VitlabError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
    if not 0 <= rank < world:
        raise VitlabError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return rank, world, local_rank, local_world


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """One GPU per process: `cuda` becomes `cuda:LOCAL_RANK` (an explicit index is kept)."""
    if device.type != "cuda":
        return device
    if device.index is None:
        if local_rank >= torch.cuda.device_count():
            raise VitlabError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s); "
                              "start at most one process per GPU")
        device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def setup(device: torch.device, fsdp: bool = False, timeout_s: float = 1800.0) -> Distributed:
    """Join (or create) the process group when there is more than one process or FSDP is asked for."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        _, _, local_rank, local_world = environment() if launched() else (rank, world, rank, world)
        device = local_device(device, local_rank)
        return Distributed(rank, world, local_rank, local_world, device, group=world > 1 or fsdp)
    rank, world, local_rank, local_world = environment()
    if world == 1 and not fsdp:
        return Distributed(device=device)
    if not dist.is_available():
        raise VitlabError("this PyTorch build has no torch.distributed")
    device = local_device(device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo" and not dist.is_gloo_available():
        raise VitlabError("distributed training on the CPU needs the gloo backend, which this PyTorch lacks")
    timeout = datetime.timedelta(seconds=timeout_s)
    if world == 1 and not launched():  # FSDP in a plain single process: an in-memory store, no networking
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    return Distributed(rank, world, local_rank, local_world, device, group=True)


def cleanup() -> None:
    """Destroy the default process group, if there is one (call once, at the end of the process's work)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for one rank's randomness (augmentation, dropout) at one step: deterministic, distinct per rank and
    step, and independent of how many steps ran in this process, so resumed runs draw the same numbers."""
    return ((seed * 1_000_003 + step) * 65_537 + rank) % (2**63 - 1)


# ---------------------------------------------------------------------------------------------------- wrapping
def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: `fully_shard` every transformer block (any `blocks`/`layers` ModuleList), then the root."""
    from torch.distributed.fsdp import fully_shard

    for name in ("blocks", "layers", "stages"):
        children = getattr(model, name, None)
        if isinstance(children, (nn.ModuleList, nn.Sequential)):
            for child in children:
                fully_shard(child)
    fully_shard(model)
    return model


def wrap_model(model: nn.Module, setup_: Distributed, fsdp: bool) -> nn.Module:
    """The module to train: FSDP2-sharded in place, DDP around it, or the model itself in one process."""
    if fsdp:
        return shard_model(model)
    if setup_.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [setup_.device.index] if setup_.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    return model


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of gradient accumulation."""
    if sync:
        yield
        return
    if hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


# ---------------------------------------------------------------------------------------------------- state
def _full_options(**changes: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **changes)


def model_state(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The full, unwrapped state dict (with FSDP: gathered onto rank 0's CPU; other ranks get an empty dict)."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options())


class FullOptimizerState:
    """An FSDP model's optimizer, seen through the full state dict in `torch.optim`'s own layout (parameters
    numbered in param-group order), so checkpoint.optimizer_to_tensors/_from_tensors write the same single file
    as an unsharded run."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(self.model, self.optimizer, options=_full_options(cpu_offload=True))
        names = [name for group in full.get("param_groups", []) for name in group["params"]]
        index = {name: number for number, name in enumerate(names)}
        groups, start = [], 0
        for group in full.get("param_groups", []):
            count = len(group["params"])
            groups.append({**group, "params": list(range(start, start + count))})
            start += count
        return {"state": {index[name]: value for name, value in full.get("state", {}).items()},
                "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        # The parameter names in param-group order: the numbering torch.optim's state_dict uses.
        by_id = {id(parameter): name for name, parameter in self.model.named_parameters()}
        names = [by_id[id(parameter)] for group in self.optimizer.param_groups for parameter in group["params"]]
        if len(names) != sum(len(group["params"]) for group in state["param_groups"]):
            raise VitlabError("the checkpoint's optimizer state does not match this model's parameters")
        groups, start = [], 0
        for group in state["param_groups"]:
            count = len(group["params"])
            groups.append({**group, "params": names[start:start + count]})
            start += count
        full = {"state": {names[int(number)]: value for number, value in state["state"].items()},
                "param_groups": groups}
        set_optimizer_state_dict(self.model, self.optimizer, full, options=_full_options())


def optimizer_view(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> Any:
    return FullOptimizerState(model, optimizer) if fsdp else optimizer


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             transform: Callable[[torch.Tensor], torch.Tensor], setup_: Distributed, batch_size: int = 1000,
             autocast: bool = False) -> EvalResult:
    """Loss, top-1 and top-5 over the whole of `images` (every rank holds it), split across ranks and summed.

    Rank r takes images r, r + world, ...; the shorter ranks are padded with weight-0 copies so every rank runs
    the same number of forward passes (FSDP gathers parameters in each one). `predictions` are this rank's.
    """
    rank, world = setup_.rank, setup_.world_size
    total = len(labels)
    per_rank = math.ceil(total / world) if total else 0
    positions = torch.arange(rank, per_rank * world, world)
    weights = (positions < total).double()
    mine = positions.clamp(max=max(total - 1, 0))
    sums, predictions = evaluation_sums(model, images, labels, mine, weights, transform, setup_.device, batch_size,
                                        autocast)
    loss, correct1, correct5 = setup_.all_reduce_sum(sums)
    count = max(total, 1)
    return EvalResult(loss / count, correct1 / count, correct5 / count, predictions)
