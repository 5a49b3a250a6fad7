"""This process's place in the job, read from the launcher's variables and checked before any rendezvous.

torch.distributed trusts RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; when they are
wrong it hangs instead of failing (a RANK outside the world waits for a peer that cannot come), or
it never sees them: ``srun --ntasks 2 python -m scd_train.train`` starts two processes that each
believe they are rank 0 of 1 and train the same run into the same directory. Every inconsistency
found here is refused with the variables named and what to do instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from scd_train.errors import InputError


class LaunchEnvError(InputError):
    """The process's launch variables are missing, malformed or contradict each other."""

    # the rank numbering itself may be what is wrong (no process may be rank 0): every process says so
    rank_local = True


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    # Started by torchrun: its agent hosts the rendezvous store, the workers only join it.
    torchrun: bool
    # The launcher, for messages ("torchrun", "the deepspeed launcher", "SLURM (srun)", ...).
    launcher: str


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    text = environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise LaunchEnvError(f"{name}={text!r} in the environment is not an integer") from None


def _launcher(environ: Mapping[str, str]) -> str:
    if "TORCHELASTIC_RUN_ID" in environ:
        return "torchrun"
    if "CROSS_RANK" in environ and "LOCAL_SIZE" in environ:
        return "the deepspeed launcher"
    if "SUBMITIT_EXECUTOR" in environ:
        return f"submitit ({environ['SUBMITIT_EXECUTOR']})"
    if "SLURM_STEP_NUM_TASKS" in environ:
        return "SLURM (srun)"
    return "the environment"


def read_launch_env(environ: Mapping[str, str]) -> LaunchEnv:
    """The checked launch variables of this process (a plain start is rank 0 of 1)."""
    launcher = _launcher(environ)
    world = _int(environ, "WORLD_SIZE")
    rank = _int(environ, "RANK")
    local_rank = _int(environ, "LOCAL_RANK", 0)
    step_tasks = _int(environ, "SLURM_STEP_NUM_TASKS")
    procid = _int(environ, "SLURM_PROCID")
    if world is None:
        if step_tasks is not None and step_tasks > 1:
            raise LaunchEnvError(
                f"SLURM started this step with {step_tasks} tasks (SLURM_STEP_NUM_TASKS={step_tasks}"
                f"{'' if procid is None else f', this is SLURM_PROCID={procid}'}), but WORLD_SIZE and RANK are "
                "unset, so every task would train alone as "
                "rank 0 of 1 into the same run directory. Submit with launchers/slurm.py (it derives the ranks "
                "from SLURM), run torchrun inside srun, or start one task (srun --ntasks 1)")
        if rank not in (None, 0):
            raise LaunchEnvError(f"RANK={rank} is set but WORLD_SIZE is not; set both (or neither, for one process)")
        return LaunchEnv(0, 1, local_rank, environ.get("MASTER_ADDR"), _int(environ, "MASTER_PORT"),
                         launcher == "torchrun", launcher)
    if world < 1:
        raise LaunchEnvError(f"WORLD_SIZE={world} must be at least 1")
    if rank is None:
        if world > 1:
            raise LaunchEnvError(f"WORLD_SIZE={world} is set but RANK is not; each process needs its RANK "
                                 f"(0..{world - 1})")
        rank = 0
    if not 0 <= rank < world:
        raise LaunchEnvError(f"RANK={rank} is outside WORLD_SIZE={world} (ranks are 0..{world - 1}): such a "
                             "process would wait for a rendezvous that cannot complete")
    local_world = _int(environ, "LOCAL_WORLD_SIZE")
    if local_rank < 0 or (local_world is not None and not local_rank < local_world):
        raise LaunchEnvError(f"LOCAL_RANK={local_rank} does not fit LOCAL_WORLD_SIZE={local_world}")
    if local_world is not None and local_world > world:
        raise LaunchEnvError(f"LOCAL_WORLD_SIZE={local_world} exceeds WORLD_SIZE={world}")
    # One srun task per rank (launchers/slurm.py, or srun with variables of one's own): SLURM's
    # numbering must agree. Under torchrun or deepspeed inside srun, one task runs several ranks.
    if launcher not in ("torchrun", "the deepspeed launcher") and step_tasks is not None and procid is not None:
        if step_tasks == world and procid != rank:
            raise LaunchEnvError(
                f"RANK={rank} but SLURM_PROCID={procid} in a step of {step_tasks} tasks with WORLD_SIZE={world}: "
                "RANK was not set for this task (is it inherited from the submitting shell?). Unset RANK and "
                "WORLD_SIZE and submit with launchers/slurm.py")
        if step_tasks != world and step_tasks > 1:
            raise LaunchEnvError(
                f"WORLD_SIZE={world} but SLURM started {step_tasks} tasks for this step (SLURM_STEP_NUM_TASKS): "
                "with one task per rank they must agree. Unset WORLD_SIZE and RANK and submit with "
                f"launchers/slurm.py, or start the step with --ntasks {world}")
    addr = environ.get("MASTER_ADDR")
    port = _int(environ, "MASTER_PORT")
    if world > 1:
        missing = [name for name, value in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if value in (None, "")]
        if missing:
            raise LaunchEnvError(f"WORLD_SIZE={world} but {' and '.join(missing)} unset; start with torchrun, the "
                                 "deepspeed launcher or launchers/slurm.py")
        if not 0 < port < 65536:
            raise LaunchEnvError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    return LaunchEnv(rank, world, local_rank, addr, port, launcher == "torchrun", launcher)
