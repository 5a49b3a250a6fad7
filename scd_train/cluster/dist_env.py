"""The torch.distributed environment of one task, derived from what the scheduler set.

Every task computes the same rendezvous on its own (first host of the allocation, a port fixed
by the job id), so no launcher process, ssh or pdsh is needed. The result is exported as the
standard variables (MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE),
which ``scd_train.parallel.runtime``, torch and DeepSpeed all read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from scd_train.cluster.hostlist import expand_hostlist, expand_tasks_per_node

# Below Linux's ephemeral range (32768+), so the port cannot be taken by an outgoing connection.
PORT_BASE = 20000
PORT_SPAN = 12000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    def variables(self) -> dict[str, str]:
        return {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port), "RANK": str(self.rank),
                "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "NODE_RANK": str(self.node_rank)}

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write the variables, replacing any inherited from the submitting shell (sbatch exports it)."""
        target = os.environ if environ is None else environ
        target.update(self.variables())


def port_for_job(job_id: str | int) -> int:
    """Rendezvous port fixed by the job id: every task of a job agrees, concurrent jobs differ."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit())
    if not digits:
        raise ValueError(f"job id {job_id!r} has no digits to derive a port from")
    return PORT_BASE + int(digits) % PORT_SPAN


def _int_var(environ: Mapping[str, str], *names: str) -> int:
    for name in names:
        if name in environ:
            value = environ[name]
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not an integer") from None
    raise KeyError(f"none of {', '.join(names)} is set; is this running inside a SLURM job step (srun)?")


def _str_var(environ: Mapping[str, str], *names: str) -> str:
    for name in names:
        if environ.get(name):
            return environ[name]
    raise KeyError(f"none of {', '.join(names)} is set; is this running inside a SLURM job step (srun)?")


def from_slurm(environ: Mapping[str, str]) -> DistEnv:
    """One srun task's place in the job, from SLURM's variables (step values preferred over job values)."""
    hosts = expand_hostlist(_str_var(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    rank = _int_var(environ, "SLURM_PROCID")
    local_rank = _int_var(environ, "SLURM_LOCALID")
    world_size = _int_var(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    node_rank = _int_var(environ, "SLURM_NODEID")
    per_node = expand_tasks_per_node(_str_var(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    if len(per_node) != len(hosts):
        raise ValueError(f"SLURM lists {len(hosts)} nodes ({','.join(hosts)}) but tasks for {len(per_node)} "
                         f"(SLURM_STEP_TASKS_PER_NODE={environ.get('SLURM_STEP_TASKS_PER_NODE')!r})")
    if sum(per_node) != world_size:
        raise ValueError(f"tasks per node {per_node} add up to {sum(per_node)}, not the {world_size} tasks "
                         "SLURM reports")
    if not 0 <= node_rank < len(hosts):
        raise ValueError(f"SLURM_NODEID={node_rank} is outside the job's {len(hosts)} nodes")
    if not 0 <= rank < world_size or not 0 <= local_rank < per_node[node_rank]:
        raise ValueError(f"SLURM_PROCID={rank}/SLURM_LOCALID={local_rank} do not fit {world_size} tasks with "
                         f"{per_node[node_rank]} on node {node_rank}")
    job_id = _str_var(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=per_node[node_rank],
                   node_rank=node_rank, num_nodes=len(hosts), master_addr=hosts[0],
                   master_port=port_for_job(job_id))


def from_submitit_local(environ: Mapping[str, str]) -> DistEnv:
    """A task of submitit's local executor: one machine, tasks numbered by submitit."""
    world_size = _int_var(environ, "SUBMITIT_LOCAL_NTASKS")
    rank = _int_var(environ, "SUBMITIT_LOCAL_GLOBALID")
    local_rank = _int_var(environ, "SUBMITIT_LOCAL_LOCALID")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=world_size,
                   node_rank=0, num_nodes=1, master_addr="127.0.0.1",
                   master_port=port_for_job(_str_var(environ, "SUBMITIT_LOCAL_JOB_ID")))


def single_process() -> DistEnv:
    return DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, num_nodes=1,
                   master_addr="127.0.0.1", master_port=PORT_BASE)


def derive(environ: Mapping[str, str]) -> DistEnv:
    """This task's environment under the executor submitit recorded (slurm, local or debug)."""
    executor = environ.get("SUBMITIT_EXECUTOR", "")
    if executor == "slurm" or (not executor and "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ):
        return from_slurm(environ)
    if executor == "local" or "SUBMITIT_LOCAL_JOB_ID" in environ:
        return from_submitit_local(environ)
    return single_process()
