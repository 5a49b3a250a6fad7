"""Submit scd-train to SLURM through submitit: one task per GPU, no ssh or pdsh.

    python launchers/slurm.py --nodes 8 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --backend deepspeed --config configs/tiny.yaml train.steps=100000 optim.lr=2e-4
    python launchers/slurm.py --nodes 2 --dry-run ...          # print the resolved job, submit nothing
    python launchers/slurm.py --sweep sweep.yaml ...           # a job array, one run directory each

Each task derives its rank and rendezvous from SLURM's variables; the job asks for SIGUSR2
``--signal-delay`` seconds before its time limit, saves at the next step boundary and requeues
itself; preemption takes the same path. A requeued job resumes in the same run directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from scd_train.cli import command
from scd_train.cluster.job import preemption_signal
from scd_train.cluster.submission import (
    CLUSTERS,
    LaunchError,
    Resources,
    check_cluster,
    describe,
    load_sweep,
    log_paths,
    make_executor,
    parse_time_minutes,
    plan_runs,
    render_dry_run,
    submit,
    submitit_folder,
)
from scd_train.config import ignored_settings
from scd_train.errors import ScdWarning


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launchers/slurm.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML config (defaults are SCD-M)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 train.steps=100")
    res = parser.add_argument_group("resources")
    res.add_argument("--nodes", type=int, default=1)
    res.add_argument("--gpus-per-node", type=int, default=8, help="one task is started per GPU")
    res.add_argument("--tasks-per-node", type=int, default=None,
                     help="only for CPU jobs (--gpus-per-node 0); defaults to the GPU count, or 1")
    res.add_argument("--cpus-per-task", type=int, default=None)
    res.add_argument("--mem", default=None, help="memory per node in SLURM's form, e.g. 500G")
    res.add_argument("--partition", default=None)
    res.add_argument("--account", default=None)
    res.add_argument("--qos", default=None)
    res.add_argument("--time", default="4:00:00", help="time limit: minutes, H:MM:SS or D-HH:MM:SS")
    res.add_argument("--constraint", default=None)
    res.add_argument("--job-name", default=None, help="defaults to the run directory's name")
    res.add_argument("--setup", action="append", default=[],
                     help="shell line run before the tasks start (repeatable), e.g. 'module load cuda'")
    job = parser.add_argument_group("job")
    job.add_argument("--backend", choices=("deepspeed", "fsdp2", "ddp"), default=None,
                     help="sets train.backend (default: the config's)")
    job.add_argument("--run-dir", default=None, help="sets train.run_dir (for a sweep: the parent of the runs)")
    job.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                     help="local: tasks on this machine; debug: one task in this process")
    job.add_argument("--signal-delay", type=int, default=180,
                     help="seconds before the time limit at which the job saves and requeues itself")
    job.add_argument("--max-timeouts", type=int, default=3,
                     help="requeues after hitting the time limit before the job gives up")
    job.add_argument("--sweep", default=None,
                     help="YAML list of override sets; submits a job array with one run directory each")
    job.add_argument("--array-parallelism", type=int, default=None, help="array tasks running at once")
    job.add_argument("--dry-run", action="store_true", help="print the resolved job and submit nothing")
    return parser


def resources_from_args(args: argparse.Namespace) -> Resources:
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(args.gpus_per_node, 1)
    resources = Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=tasks,
                          cpus_per_task=args.cpus_per_task, mem=args.mem, partition=args.partition,
                          account=args.account, qos=args.qos, time_min=parse_time_minutes(args.time),
                          constraint=args.constraint, signal_delay_s=args.signal_delay,
                          array_parallelism=args.array_parallelism, setup=list(args.setup))
    resources.check()
    return resources


def check_preemption_signal() -> None:
    if "SUBMITIT_PREEMPT_SIGNAL" not in os.environ:
        return  # submitit's default, SIGUSR2, is one the trainer stops on
    from scd_train.trainer import STOP_SIGNALS

    sig = preemption_signal()
    if sig not in STOP_SIGNALS:
        raise LaunchError(f"SUBMITIT_PREEMPT_SIGNAL={sig.name[3:]}: the trainer saves on "
                          f"{', '.join(s.name for s in STOP_SIGNALS)} only; unset it or set it to USR2")


def report_submission(jobs: list, info: dict, folder, cluster: str) -> None:
    world = info["world_size"]
    for job, run in zip(jobs, info["runs"]):
        print(f"submitted job {job.job_id}: {world} task(s), backend {info['backend']}")
        print(f"  run directory: {run['run_dir']}")
        logs = log_paths(folder, job.job_id, world)
        print(f"  logs, one per rank: {logs[0]} ... {logs[-1].name} (stderr: *_log.err)")
        print(f"  follow rank 0:      tail -F {logs[0]} {logs[0].with_suffix('.err')}")
    if cluster == "slurm":
        ids = " ".join(sorted({str(j.job_id).split("_")[0] for j in jobs}))
        print(f"status: squeue -j {ids}    cancel: scancel {ids}    training log: <run directory>/train.log")


@command("launchers/slurm.py")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_preemption_signal()
    resources = resources_from_args(args)
    check_cluster(args.cluster, resources)
    sweep = load_sweep(args.sweep) if args.sweep else None
    runs = plan_runs(args.config, args.overrides, args.backend, args.run_dir, resources.world_size, sweep)
    for note in dict.fromkeys(n for run in runs for n in ignored_settings(run.cfg)):
        warnings.warn(note, ScdWarning, stacklevel=1)
    resources.job_name = args.job_name or (runs[0].run_dir.parent if sweep else runs[0].run_dir).name
    info = describe(resources, runs, args.cluster, sweep is not None)
    if args.dry_run:
        print(render_dry_run(info), end="")
        return 0
    folder = submitit_folder(runs, sweep is not None)
    executor = make_executor(args.cluster, folder, resources, args.max_timeouts)
    jobs = submit(executor, runs, sweep is not None)
    report_submission(jobs, info, folder, args.cluster)
    if args.cluster != "slurm":
        # Local and debug jobs live in this process (or its children): wait for them.
        for job in jobs:
            summaries = job.results()
            print(f"job {job.job_id}: {summaries[0]['status']} at step {summaries[0]['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
