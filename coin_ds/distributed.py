"""Process-group setup and the few collectives the trainer needs (OpenCLIP `gather_features` style)."""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(timeout_s: int = 600) -> None:
    """Join the job's process group: DeepSpeed's launcher, srun/torchrun env vars, or a lone process."""
    import deepspeed

    if dist.is_initialized():
        return
    # DeepSpeed calls collectives that torch has renamed; the warnings repeat every step
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # a plain `python coin_ds/train.py`: a group of one, so the same code path runs everywhere
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if not torch.cuda.is_available():
        # ranks share the CPU cores instead of each spawning a thread per core
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), dist_init_required=True,
                               auto_mpi_discovery=False)
    release_shm_buffer()


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU backend keeps a rank's shared-memory allreduce buffer (deepspeed/ops/csrc/cpu/comm)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer() -> None:
    """Unlink this rank's shared-memory allreduce buffer once every rank has mapped it.

    With all ranks on one machine and no GPU, DeepSpeed gives each rank a 69 MB buffer in /dev/shm and never unlinks
    it, so every CPU run leaks 69 MB of memory a rank until the machine runs out (seen here: 310 buffers, 20 GB, then
    the OOM killer). A rank maps every peer's buffer before `init_distributed` returns, so after a barrier the names
    can go: the memory stays mapped while the ranks run and is freed when they exit, killed ranks included."""
    if dist.get_world_size() > 1:
        dist.barrier()  # every rank, whether or not it has a buffer: no rank may wait alone
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; gradients flow back to the rank that produced each row."""
    if world_size() == 1:
        return t
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():
        # deprecated in favour of functional collectives, whose gather has no autograd yet; this one does
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_fn.all_gather(t.contiguous()), dim=0)


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) tensor over ranks."""
    if world_size() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
