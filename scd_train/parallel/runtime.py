"""Process group, device and rank facts, and the few collectives the trainer needs."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    @property
    def collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def shutdown(self) -> None:
        if self.distributed:
            dist.barrier()
            dist.destroy_process_group()


def resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_runtime(device_choice: str = "auto", timeout_minutes: float = 30.0) -> Runtime:
    """Join the process group described by the launcher's environment (torchrun, deepspeed,
    SLURM via our launcher); a plain ``python`` start is a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world_size > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {var} is unset; start with torchrun, the "
                                   "deepspeed launcher or launchers/slurm.py")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device)


def ensure_process_group(runtime: Runtime) -> None:
    """Give a one-process run a (world size 1) process group, for backends that always need one.

    Uses the launcher's MASTER_ADDR/MASTER_PORT when set (torchrun --nproc_per_node 1), otherwise
    a free local port.
    """
    if runtime.distributed:
        return
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1,
                            device_id=runtime.device if runtime.device.type == "cuda" else None)
