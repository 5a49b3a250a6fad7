"""What a cluster launch resolves to (resources, runs, sbatch script, per-rank environment) and
its submission through submitit."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scd_train.cluster import dist_env, storage_env
from scd_train.config import Config, ConfigError, load_config
from scd_train.errors import InputError

CLUSTERS = ("slurm", "local", "debug")
EXAMPLE_JOB_ID = 12345


class LaunchError(InputError):
    """A launch request that cannot be submitted as given."""


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 8
    cpus_per_task: int | None = None
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 240
    constraint: str | None = None
    job_name: str = "scd-train"
    signal_delay_s: int = 180
    array_parallelism: int | None = None
    setup: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def check(self) -> None:
        for name in ("nodes", "tasks_per_node"):
            if getattr(self, name) < 1:
                raise LaunchError(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        if self.gpus_per_node < 0:
            raise LaunchError(f"--gpus-per-node={self.gpus_per_node} must be >= 0")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise LaunchError(f"--tasks-per-node={self.tasks_per_node} with --gpus-per-node={self.gpus_per_node}: "
                              "jobs run one task per GPU (drop --tasks-per-node)")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LaunchError(f"--cpus-per-task={self.cpus_per_task} must be at least 1")
        if self.time_min < 1:
            raise LaunchError(f"--time must be at least one minute, got {self.time_min} min")
        if not 0 < self.signal_delay_s < self.time_min * 60:
            raise LaunchError(f"--signal-delay={self.signal_delay_s}s must be positive and shorter than the "
                              f"time limit ({self.time_min * 60}s)")
        if self.array_parallelism is not None and self.array_parallelism < 1:
            raise LaunchError(f"--array-parallelism={self.array_parallelism} must be at least 1")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?B?", self.mem, flags=re.IGNORECASE):
            raise LaunchError(f"--mem={self.mem!r}: expected SLURM's form, e.g. 64G or 500000M")

    def sbatch_parameters(self) -> dict:
        """Parameters for submitit's SlurmExecutor (SLURM's option names with underscores)."""
        params = {"job_name": self.job_name, "nodes": self.nodes, "ntasks_per_node": self.tasks_per_node,
                  "time": self.time_min, "signal_delay_s": self.signal_delay_s}
        optional = {"gpus_per_node": self.gpus_per_node or None, "cpus_per_task": self.cpus_per_task,
                    "mem": self.mem, "partition": self.partition, "account": self.account, "qos": self.qos,
                    "constraint": self.constraint, "setup": list(self.setup) or None,
                    "array_parallelism": self.array_parallelism}
        params.update({k: v for k, v in optional.items() if v is not None})
        return params


def parse_time_minutes(text: str) -> int:
    """SLURM time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise LaunchError(f"--time={text!r}: expected minutes, H:MM:SS or D-HH:MM:SS")
    days, a, b, c = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        total_s = ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    elif c is not None:  # H:M:S
        total_s = (int(a) * 60 + int(b)) * 60 + int(c)
    elif b is not None:  # M:S
        total_s = int(a) * 60 + int(b)
    else:  # M
        total_s = int(a) * 60
    return max(1, math.ceil(total_s / 60))


@dataclass
class PlannedRun:
    """One training run of the job (a sweep has several): its overrides and resolved config."""

    index: int
    overrides: list[str]
    cfg: Config

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)


def load_sweep(path: str | Path) -> list[list[str]]:
    """A YAML list of override sets; each set is a mapping of dotted keys or a list of ``key=value``."""
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"sweep file {path} does not exist")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, list) or not raw:
        raise LaunchError(f"sweep file {path}: expected a non-empty YAML list of override sets, "
                          f"got {type(raw).__name__}")
    sets = []
    for i, item in enumerate(raw):
        if isinstance(item, dict):
            sets.append([f"{key}={json.dumps(value)}" for key, value in item.items()])
        elif isinstance(item, list) and all(isinstance(o, str) and "=" in o for o in item):
            sets.append(list(item))
        else:
            raise LaunchError(f"sweep file {path}, entry {i}: expected a mapping like {{optim.lr: 1.0e-4}} or a "
                              f"list of 'key=value' strings, got {item!r}")
    return sets


def sweep_member_name(index: int, overrides: list[str]) -> str:
    """Folder name of a sweep member: its index and a readable digest of its overrides."""
    parts = []
    for override in overrides:
        key, _, value = override.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}-{value.strip(chr(34))}")
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", "_".join(parts)).strip("_")[:80]
    return f"{index:03d}_{slug}" if slug else f"{index:03d}"


def plan_runs(config: str | None, overrides: list[str], backend: str | None, run_dir: str | None,
              world_size: int, sweep: list[list[str]] | None = None) -> list[PlannedRun]:
    """Resolve and validate every run's config now, so a bad key fails here and not on the cluster."""
    base = list(overrides)
    if backend is not None:
        base.append(f"train.backend={backend}")
    try:
        root = Path(run_dir or load_config(config, base).train.run_dir).resolve()
    except ConfigError as exc:
        raise LaunchError(str(exc)) from None
    members = sweep if sweep is not None else [[]]
    runs = []
    for index, extra in enumerate(members):
        where = root / sweep_member_name(index, extra) if sweep is not None else root
        try:
            cfg = load_config(config, base + extra + [f"train.run_dir={where}"])
        except ConfigError as exc:
            label = f"sweep entry {index} ({' '.join(extra)}): " if sweep is not None else ""
            raise LaunchError(f"{label}{exc}") from None
        if world_size > 1 and cfg.train.backend == "single":
            raise LaunchError(f"{world_size} tasks need a distributed backend but train.backend='single'; "
                              "pass --backend ddp, fsdp2 or deepspeed")
        if storage_env.uses_object_storage(cfg):
            _check_storage_credentials(cfg)
        runs.append(PlannedRun(index, base + extra, cfg))
    return runs


def _check_storage_credentials(cfg: Config) -> None:
    """No credentials for a bucket fail here, on the login node, not in every task after queueing
    (``NoCredentials`` is an input error: the command prints it like any other)."""
    from scd_train.storage import is_remote
    from scd_train.storage.location import check_credentials

    check_credentials(next(p for p in (cfg.data.path, cfg.data.holdout_path) if is_remote(p)))


def submitit_folder(runs: list[PlannedRun], sweep: bool) -> Path:
    """Where submitit keeps the job's pickles and per-rank logs."""
    root = runs[0].run_dir.parent if sweep else runs[0].run_dir
    return root / "slurm"


def submitit_command(folder: Path) -> str:
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(resources: Resources, folder: Path, array_size: int | None = None) -> str:
    """The batch script submitit will write for these resources (its own generator, so it matches)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = resources.sbatch_parameters()
    if array_size is not None:
        params["map_count"] = array_size
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **params)


def example_rank_environments(resources: Resources, job_id: int = EXAMPLE_JOB_ID) -> tuple[str, list[dict]]:
    """Each rank's exported variables for an example allocation (SLURM picks the real nodes)."""
    width = max(2, len(str(resources.nodes)))
    nodelist = "node" + (f"[{1:0{width}d}-{resources.nodes:0{width}d}]" if resources.nodes > 1 else "1".zfill(width))
    rows = []
    for rank in range(resources.world_size):
        slurm_vars = {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": nodelist, "SLURM_PROCID": str(rank),
                      "SLURM_LOCALID": str(rank % resources.tasks_per_node),
                      "SLURM_NODEID": str(rank // resources.tasks_per_node),
                      "SLURM_STEP_NUM_TASKS": str(resources.world_size),
                      "SLURM_STEP_TASKS_PER_NODE": f"{resources.tasks_per_node}(x{resources.nodes})"}
        rows.append(dist_env.from_slurm(slurm_vars).variables())
    return nodelist, rows


def describe(resources: Resources, runs: list[PlannedRun], cluster: str, sweep: bool) -> dict:
    """Everything a dry run prints, as data."""
    folder = submitit_folder(runs, sweep)
    nodelist, ranks = example_rank_environments(resources)
    cfg = runs[0].cfg
    return {
        "cluster": cluster,
        "world_size": resources.world_size,
        "nodes": resources.nodes,
        "tasks_per_node": resources.tasks_per_node,
        "gpus_per_node": resources.gpus_per_node,
        "backend": cfg.train.backend,
        "global_batch": cfg.data.batch_size * cfg.train.grad_accum * resources.world_size,
        "submitit_folder": str(folder),
        "runs": [{"run_dir": str(r.run_dir), "overrides": r.overrides} for r in runs],
        "sbatch": sbatch_script(resources, folder, len(runs) if sweep else None),
        "example_allocation": {"job_id": EXAMPLE_JOB_ID, "nodelist": nodelist},
        "rank_environment": ranks,
        "object_storage": storage_env.capture(os.environ) if any(
            storage_env.uses_object_storage(r.cfg) for r in runs) else None,
    }


def render_dry_run(info: dict) -> str:
    cfg_line = (f"world size {info['world_size']} = {info['nodes']} node(s) x {info['tasks_per_node']} task(s) "
                f"per node ({'one per GPU' if info['gpus_per_node'] else 'CPU tasks'}); backend {info['backend']}; "
                f"global batch {info['global_batch']} clips per step")
    lines = ["DRY RUN: nothing was submitted.", f"cluster: {info['cluster']}", cfg_line,
             f"submitit folder (pickles, one log per rank): {info['submitit_folder']}", ""]
    lines.append("runs:" if len(info["runs"]) > 1 else "run:")
    for i, run in enumerate(info["runs"]):
        prefix = f"  [{i}] " if len(info["runs"]) > 1 else "  "
        lines.append(f"{prefix}run directory {run['run_dir']}")
        lines.append(f"{' ' * len(prefix)}overrides: {' '.join(run['overrides']) or '(none)'}")
    if info.get("object_storage") is not None:
        lines += ["", "object storage (s3:// data): passed to every task: "
                  + storage_env.describe(info["object_storage"])]
    lines += ["", "sbatch script:", info["sbatch"].rstrip(), ""]
    example = info["example_allocation"]
    lines.append(f"per-rank environment (example allocation: job {example['job_id']} on {example['nodelist']}; "
                 "each task derives the real values from SLURM's variables):")
    keys = ["RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
    rows = info["rank_environment"]
    shown = rows if len(rows) <= 32 else rows[:16] + [None] + rows[-8:]
    for row in shown:
        lines.append("  ..." if row is None else "  " + " ".join(f"{k}={row[k]}" for k in keys))
    return "\n".join(lines) + "\n"


def check_cluster(cluster: str, resources: Resources) -> None:
    """Local and debug jobs run on this machine: one node; debug also one task."""
    if cluster not in CLUSTERS:
        raise LaunchError(f"--cluster={cluster!r}: expected one of {', '.join(CLUSTERS)}")
    if cluster != "slurm" and resources.nodes != 1:
        raise LaunchError(f"--cluster {cluster} runs on this machine only; got --nodes={resources.nodes}")
    if cluster == "debug" and resources.world_size != 1:
        raise LaunchError(f"--cluster debug runs one task in this process; got {resources.world_size} tasks "
                          "(use --cluster local for several)")


def make_executor(cluster: str, folder: Path, resources: Resources, max_timeouts: int):
    """A submitit executor for ``cluster`` with these resources."""
    import submitit

    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_timeouts)
        executor.update_parameters(**resources.sbatch_parameters())
        return executor
    check_cluster(cluster, resources)
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_timeouts)
        executor.update_parameters(timeout_min=resources.time_min, tasks_per_node=resources.tasks_per_node,
                                   gpus_per_node=resources.gpus_per_node, nodes=1,
                                   signal_delay_s=resources.signal_delay_s)
        return executor
    if cluster == "debug":
        return submitit.DebugExecutor(folder=folder)
    raise LaunchError(f"--cluster={cluster!r}: expected one of {', '.join(CLUSTERS)}")


def submit(executor, runs: list[PlannedRun], sweep: bool) -> list:
    """Submit one job, or one job array for a sweep; returns submitit's job handles."""
    from scd_train.cluster.job import TrainingJob

    storage = storage_env.capture(os.environ)  # the same for every run of a sweep
    if not sweep:
        return [executor.submit(TrainingJob(runs[0].cfg, storage))]
    with executor.batch():
        jobs = [executor.submit(TrainingJob(run.cfg, storage)) for run in runs]
    return jobs


def log_paths(folder: Path, job_id: str, world_size: int) -> list[Path]:
    """One stdout log per rank (stderr sits next to it as ``..._log.err``)."""
    return [folder / f"{job_id}_{rank}_log.out" for rank in range(world_size)]
