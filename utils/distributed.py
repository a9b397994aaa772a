"""Data-parallel training across processes started by torchrun (torch.distributed underneath).

A run is distributed only when torchrun's environment says so (WORLD_SIZE > 1, RANK,
LOCAL_RANK, MASTER_ADDR/PORT set by its rendezvous); a plain `python run.py` never touches
torch.distributed, and every helper here is then the identity (or a no-op).

Backend: NCCL when the run's device is CUDA (each rank takes the GPU its LOCAL_RANK names),
gloo otherwise (CPU). Evaluation is shared out with one helper, map_in_turns (rank r takes
items r, r + N, ...; rank 0 gathers): whole views, orbit frames, or N blocks of a view's rays
or of a grid's planes, so that no rank waits in a collective while another renders alone.
"""
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


class DistributedError(RuntimeError):
    """A distributed launch that cannot work; the message says what to change."""


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when launched without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the only process that writes files, logs to TensorBoard and shows progress."""
    return rank() == 0


def choose_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(requested: torch.device) -> torch.device:
    """The device of this rank: on CUDA the GPU LOCAL_RANK names (one GPU per process)."""
    if requested.type != "cuda":
        return requested
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node: start at most "
            f"that many processes per node (torchrun --nproc_per_node {torch.cuda.device_count()})"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_from_env(device: torch.device) -> torch.device:
    """Join torchrun's process group when WORLD_SIZE > 1 -> this rank's device. Without
    torchrun (or with one process) nothing is initialised and `device` comes back as is."""
    if env_world_size() <= 1 or is_initialized():
        return device
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} not set: launch with torchrun "
            "(torchrun --nproc_per_node N run.py ...), or unset WORLD_SIZE for a single process"
        )
    device = rank_device(device)
    dist.init_process_group(backend=choose_backend(device), device_id=device if device.type == "cuda" else None)
    return device


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def comm_device() -> torch.device:
    """Where collectives take their tensors: NCCL only reduces GPU tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(values: torch.Tensor, op) -> torch.Tensor:
    """values reduced over ranks with `op`, as a new tensor on values' device."""
    if not is_initialized():
        return values.clone()
    reduced = values.to(comm_device(), copy=True)
    dist.all_reduce(reduced, op=op)
    return reduced.to(values.device)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a copy; the input is left as it was)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (a copy)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def mean_over_ranks(values: Dict[str, float]) -> Dict[str, float]:
    """The mean over ranks of each value (every rank passes the same keys), for logging."""
    if not is_initialized():
        return values
    keys = sorted(values)
    total = all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return {k: v / world_size() for k, v in zip(keys, total.tolist())}


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite `tensors` in place with rank src's values."""
    if not is_initialized():
        return
    for t in tensors:
        dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src=src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's picklable object, on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> Optional[List[Any]]:
    """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
    if not is_initialized():
        return [obj]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of a rank's own random stream (rays, stratified jitter). Rank 0 keeps the config
    seed, so rank 0 of any run draws what a single-process run draws; `step` gives fresh
    streams to ranks that resume a checkpoint saved under another world size."""
    return seed + 1_000_003 * rank + step


def share_of(n: int, r: int, world: int) -> slice:
    """Rank r's share of n items among `world` ranks (contiguous, sizes differing by at
    most one)."""
    return slice(r * n // world, (r + 1) * n // world)


def rank_slice(n: int) -> slice:
    """This rank's share of n items."""
    return share_of(n, rank(), world_size())


def map_in_turns(fn: Callable[[T], R], items: Sequence[T]) -> Iterator[Tuple[T, R]]:
    """The one shard-and-gather helper: fn over items shared out in turns: item i runs on rank i % world_size, one item per rank
    per round, and each round's results are gathered to rank 0 -> on rank 0 every (item, result)
    in item order, as its round completes; on the other ranks nothing, though they must run
    through the iterator all the same (each round ends in a collective). Results travel pickled:
    return CPU data (a CUDA tensor would arrive on the sender's GPU index)."""
    for start in range(0, len(items), world_size()):
        turn = items[start : start + world_size()]
        results = gather_objects(fn(turn[rank()]) if rank() < len(turn) else None)
        if is_main():
            yield from zip(turn, results)


class Shards:
    """What rank-agnostic evaluation needs of the process group, in one place: `map` is
    map_in_turns (rank r takes items r, r + N, ...; rank 0 gets every result), `blocks(n)`
    the N contiguous blocks of n rows (one item per rank), `writes` whether this process
    writes the results (rank 0), `agree(obj)` rank 0's obj on every rank. Without torchrun
    it is a plain map over all items, in this process."""

    @staticmethod
    def map(fn: Callable[[T], R], items: Sequence[T]) -> Iterator[Tuple[T, R]]:
        return map_in_turns(fn, items)

    @staticmethod
    def blocks(n: int) -> List[slice]:
        return [share_of(n, r, world_size()) for r in range(world_size())]

    @property
    def writes(self) -> bool:
        return is_main()

    @staticmethod
    def agree(obj: Any) -> Any:
        return broadcast_object(obj)
