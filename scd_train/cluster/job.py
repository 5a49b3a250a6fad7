"""The callable submitit runs in every task: set up the distributed environment, train, requeue.

Stopping and requeueing is split between the trainer and submitit:

* while the training loop runs, the trainer owns SIGTERM and SIGUSR2. ``--signal`` makes SLURM
  send SIGUSR2 ahead of the time limit; a preemption sends SIGTERM (or SIGUSR2 where the cluster
  sets ``preempt_send_user_signal``). Every rank finishes its step, the stop decision is
  all-reduced, and one complete checkpoint is written;
* the trainer then returns, and if the job is still RUNNING in SLURM's eyes (a time-limit warning
  or a preemption, as opposed to ``scancel`` or the hard limit, which leave it COMPLETING), every
  task hands over to the handler submitit installed for its preemption signal. On task 0 it calls
  :meth:`TrainingJob.checkpoint`, stores the returned resubmission and runs ``scontrol requeue``;
  other tasks return. The requeued job runs the same callable, whose config points at the same
  run directory, so the trainer resumes from the latest complete checkpoint and continues the
  logger run stored in it;
* a run that finished is never requeued: the preemption signal is ignored from then on and
  :meth:`checkpoint` returns None. Exiting 0 after a stop would also be wrong: SLURM would record
  a preempted job as COMPLETED and never restart it.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import submitit
from submitit.core.job_environment import SignalHandler

from scd_train.cluster import dist_env, storage_env
from scd_train.config import Config
from scd_train.errors import InputError

log = logging.getLogger("scd_train.cluster")


def preemption_signal() -> signal.Signals:
    """The signal submitit checkpoints on (``SUBMITIT_PREEMPT_SIGNAL``, default USR2)."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    try:
        return signal.Signals[name]
    except KeyError:
        raise InputError(f"SUBMITIT_PREEMPT_SIGNAL names an unknown signal {name!r}") from None


def submitit_requeue_handler(sig: int) -> SignalHandler | None:
    """submitit's checkpoint-and-requeue handler for ``sig`` when one is installed (not under debug)."""
    handler = signal.getsignal(sig)
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, SignalHandler) else None


class TrainingJob(submitit.helpers.Checkpointable):
    """One training run; pickled once at submission and again at every requeue."""

    def __init__(self, cfg: Config, storage_env: dict | None = None) -> None:
        self.cfg = cfg
        self.finished = False
        # object-storage settings of the submitting shell (no secrets), see cluster/storage_env.py
        self.storage_env = storage_env or {}

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    def __call__(self) -> dict:
        env = dist_env.derive(os.environ)
        env.export()
        storage_env.apply(self.storage_env)
        _log_placement(env)
        from scd_train.trainer import Trainer  # heavy; keeps unpickling the job cheap

        trainer = Trainer(self.cfg)
        result = trainer.run()
        trainer.runtime.shutdown()
        summary = {"status": result.status, "step": result.step, "run_dir": str(result.run_dir),
                   "rank": env.rank}
        sig = preemption_signal()
        if result.status == "finished":
            self.finished = True
            signal.signal(sig, _ignore_after_finish)
        elif env.rank == 0 and job_continues_after_stop():
            # Only task 0 requeues (the others would return at once), so only it asks the scheduler.
            # On success this does not return: submitit exits after `scontrol requeue`.
            self._hand_over_to_submitit(sig)
        if env.world_size > 1:
            atexit.register(_exit_without_finalization)
        return summary

    def _hand_over_to_submitit(self, sig: int) -> None:
        handler = submitit_requeue_handler(sig)
        if handler is None:
            log.warning("stopped by signal %d at a saved checkpoint; no submitit requeue handler here, so "
                        "submit again to continue from %s", sig, self.run_dir)
            return
        # Calls checkpoint(), stores the resubmission, runs `scontrol requeue` and exits.
        handler.checkpoint_and_try_requeue(sig)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission | None:
        """Resubmission for a requeue: the same run, always resumed (a requeue of a run started with
        train.resume=false must continue it, never archive or overwrite what it saved)."""
        if self.finished:
            log.info("training finished; not requeueing")
            return None
        cfg = copy.deepcopy(self.cfg)
        cfg.train.resume = True
        return submitit.helpers.DelayedSubmission(TrainingJob(cfg, self.storage_env), *args, **kwargs)


def job_continues_after_stop() -> bool:
    """Whether the scheduler still runs this job after a stop signal, i.e. it should be requeued."""
    executor = os.environ.get("SUBMITIT_EXECUTOR", "")
    if executor == "local":
        return True  # only submitit's own timeout signal stops a local job
    job_id = os.environ.get("SLURM_JOB_ID")
    if executor != "slurm" or not job_id:
        return False
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot read job %s's state (%s); not requeueing", job_id, exc)
        return False
    fields = dict(re.findall(r"(\w+)=(\S*)", out))
    state, preempted = fields.get("JobState", "?"), fields.get("PreemptTime", "None")
    log.warning("stopped at a saved checkpoint; job %s is %s (preempted at %s)", job_id, state, preempted)
    return state == "RUNNING"


def _exit_without_finalization() -> None:
    """Runs first at interpreter exit, after submitit has stored the result: skips finalization, where
    gloo can abort (SIGABRT from a still-joinable thread) and turn a finished task into a failed one."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _ignore_after_finish(signum, frame) -> None:  # noqa: ARG001
    log.warning("signal %d after training finished: ignored, the job is not requeued", signum)


def _log_placement(env: dist_env.DistEnv) -> None:
    # Printed, not logged: the trainer configures logging later, and this line belongs in every rank's log.
    print(f"scd-train task: rank {env.rank}/{env.world_size} (local {env.local_rank}/{env.local_world_size}, "
          f"node {env.node_rank}/{env.num_nodes}), rendezvous {env.master_addr}:{env.master_port}, "
          f"job {os.environ.get('SLURM_JOB_ID', '-')}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')}",
          file=sys.stderr, flush=True)
