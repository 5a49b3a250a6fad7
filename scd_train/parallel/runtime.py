"""Process group, device and rank facts, and the few collectives the trainer needs."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from scd_train.errors import InputError, RunFailure, ScdError
from scd_train.parallel.launch_env import read_launch_env
from scd_train.parallel.rendezvous import rendezvous

T = TypeVar("T")


class LaunchEnvironmentError(InputError):
    """The process's device or launch environment cannot run this config."""

    # the rank numbering itself may be what is wrong (no process may be rank 0): every process says so
    rank_local = True


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

    def all_gather_object(self, obj) -> list:
        """``obj`` of every rank, in rank order (a one-element list without a process group)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 only, its result on every rank; when it raises, every rank raises
        (the same ScdError, or a RunFailure naming rank 0's error), so no rank waits for a peer that quit."""
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except ScdError as exc:
                outcome = ("raise", exc)
            except BaseException as exc:
                self.broadcast_object(("raise", RunFailure(f"rank 0 failed: {type(exc).__name__}: {exc}")))
                raise
        kind, value = self.broadcast_object(outcome)
        if kind == "raise":
            raise value
        return value

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
            raise LaunchEnvironmentError("train.device='cuda' but no CUDA device is visible to this process; "
                                         "use train.device=cpu (or auto), or check CUDA_VISIBLE_DEVICES")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise LaunchEnvironmentError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible; "
                                         "start one process per GPU")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_device_option(text: str, option: str = "--device") -> torch.device:
    """A device named on the command line, refused early when it cannot exist here."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise LaunchEnvironmentError(f"{option} {text!r} is not a device name (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LaunchEnvironmentError(f"{option} {text}: no CUDA device is visible to this process; "
                                         "use --device cpu")
        if device.index is not None and device.index >= count:
            raise LaunchEnvironmentError(f"{option} {text}: only {count} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise LaunchEnvironmentError(f"{option} {text!r}: expected cpu, cuda or cuda:N")
    return device


def init_runtime(device_choice: str = "auto", timeout_minutes: float = 30.0,
                 rendezvous_timeout_s: float = 300.0) -> Runtime:
    """Join the process group described by the launcher's environment (torchrun, deepspeed,
    SLURM via our launcher); a plain ``python`` start is a single process.

    The environment is checked first (scd_train.parallel.launch_env); the rendezvous then waits at
    most ``rendezvous_timeout_s`` for the other ranks, saying which are missing, and collectives
    time out after ``timeout_minutes``.
    """
    env = read_launch_env(os.environ)
    device = resolve_device(device_choice, env.local_rank)
    if env.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        options = {"rank": env.rank, "world_size": env.world_size,
                   "timeout": datetime.timedelta(minutes=timeout_minutes),
                   "device_id": device if device.type == "cuda" else None}
        if env.torchrun:  # torchrun's agent gathered the workers and hosts the store
            dist.init_process_group(backend, **options)
        else:
            dist.init_process_group(backend, store=rendezvous(env, rendezvous_timeout_s), **options)
    return Runtime(env.rank, env.world_size, env.local_rank, device)


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
    for var in ("RANK", "LOCAL_RANK"):  # DeepSpeed reads these from the environment
        os.environ.setdefault(var, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1,
                            device_id=runtime.device if runtime.device.type == "cuda" else None)
