"""The SLURM launcher against a real single-node SLURM started for these tests.

The module fixture starts munged, slurmctld and slurmd as the current user, with a private munge
key, socket, ports and slurm.conf under a temporary directory, and stops them by PID afterwards.
Where SLURM and munge are not installed (``.ci/install-slurm.sh`` installs them) the tests skip.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order

MICRO_CONFIG = """
model: {arch: scd, latent_channels: 48, latent_height: 4, latent_width: 4, patch_size: 2, width: 32,
        num_heads: 2, head_dim: 16, rope_axes: [4, 6, 6], encoder_layers: 1, decoder_layers: 1, layers: 2,
        max_frames: 16}
diffusion: {decoder_multi_batch: 1, sample_steps: 2}
optim: {lr: 1.0e-3, warmup_steps: 5, ema_decay: 0.9}
data:
  clip_frames: 4
  clip_stride: 2
  batch_size: 2
  synthetic: {num_videos: 16, frames_per_video: 8, image_size: 16, digit_scale: 1, speed: 1, codec_factor: 4}
train: {steps: 20, precision: fp32, device: cpu, checkpoint_every: 50}
log: {every: 1, wandb: disabled, progress_bar: false}
"""


def _find(binary: str) -> str | None:
    """Daemons live in sbin, which a non-root PATH often lacks."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which(binary, path=search)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_name() -> str:
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
        return name
    except OSError:  # the rendezvous address is the node name, so it has to resolve
        return "localhost"


class LocalSlurm:
    """A one-node SLURM cluster owned by this process: daemons, config and state in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.node = _node_name()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)
        self.pids: dict[str, int] = {}

    def write_config(self) -> None:
        user, root = getpass.getuser(), self.root
        cpus = max(2, os.cpu_count() or 2)
        self.conf.write_text(f"""\
ClusterName=scdtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job waits this long before it may start again (default 120 s)
AuthInfo=socket={root}/run/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,preempt_send_user_signal
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=10
InactiveLimit=0
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=600
PartitionName=urgent Nodes={self.node} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
""")

    def start(self) -> None:
        for sub in ("run", "state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o755)
        key_dir = self.root / "key"
        key_dir.mkdir(mode=0o700)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.write_config()
        r = self.root
        self._daemon("munged", [_find("munged"), f"--socket={r}/run/munge.socket", f"--key-file={key}",
                                f"--pid-file={r}/run/munged.pid", f"--seed-file={key_dir}/seed",
                                f"--log-file={r}/log/munged.log"])
        self._daemon("slurmctld", [_find("slurmctld"), "-f", str(self.conf)])
        self._daemon("slurmd", [_find("slurmd"), "-f", str(self.conf), "-N", self.node])
        self.wait_for(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False), 30, "node idle")

    def _daemon(self, name: str, argv: list[str]) -> None:
        """Start a daemon that forks itself, and record the PID from its pid file."""
        pid_file = self.root / "run" / f"{name}.pid"
        subprocess.run(argv, env=self.env, check=True, capture_output=True, timeout=30)

        def started() -> bool:
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            return text.isdigit() and Path(f"/proc/{text}").exists()

        self.wait_for(started, 15, f"{name} pid file")
        self.pids[name] = int(pid_file.read_text())

    def stop(self) -> None:
        if "slurmctld" in self.pids:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                self.wait_for(lambda: not self.run("squeue", "-h", "-o", "%i", check=False).strip(), 30,
                              "jobs cancelled", fail=False)
        for name in DAEMONS:
            pid = self.pids.pop(name, None)
            if pid is None or not _process_is(pid, name):
                continue
            os.kill(pid, signal.SIGTERM)
            if not self.wait_for(lambda p=pid: not Path(f"/proc/{p}").exists(), 15, f"{name} exit", fail=False):
                os.kill(pid, signal.SIGKILL)

    def run(self, *argv: str, check: bool = True) -> str:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, predicate, timeout: float, what: str, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.25)
        if fail:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")
        return False

    def wait_job_done(self, job_id: str, timeout: float) -> dict[str, str]:
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
        self.wait_for(lambda: self.job(job_id).get("JobState") in done, timeout, f"job {job_id} to end")
        return self.job(job_id)

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(path.read_text().splitlines()[-25:]))
        return "\n".join(parts)


def _process_is(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


@pytest.fixture(scope="module")
def slurm():
    missing = [b for b in BINARIES if _find(b) is None]
    if missing:
        pytest.skip(f"SLURM/munge not installed (missing {', '.join(missing)}); .ci/install-slurm.sh installs them")
    root = Path(tempfile.mkdtemp(prefix="scd-slurm-", dir="/tmp"))  # short: munge's socket path is limited
    root.chmod(0o755)  # munged wants its socket directory reachable by every user
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def launch(slurm: LocalSlurm, repo_root: Path, env: dict, tmp_path: Path, *args: str) -> list[str]:
    """Run launchers/slurm.py against the test cluster; returns the submitted job ids."""
    config = tmp_path / "micro.yaml"
    config.write_text(MICRO_CONFIG)
    proc = subprocess.run([sys.executable, str(repo_root / "launchers" / "slurm.py"), "--cluster", "slurm",
                           "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10", "--signal-delay", "60",
                           "--config", str(config), *args],
                          env={**env, "SLURM_CONF": str(slurm.conf)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return re.findall(r"submitted job (\S+):", proc.stdout)


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def latest_checkpoint_step(run_dir: Path) -> int:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())["step"]


def test_sweep_runs_as_job_array(slurm, repo_root, subprocess_env, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("- {optim.lr: 1.0e-3}\n- {optim.lr: 2.0e-3}\n")
    ids = launch(slurm, repo_root, subprocess_env, tmp_path, "--tasks-per-node", "1", "--sweep", str(sweep),
                 "--run-dir", str(tmp_path / "sweep"), "train.steps=6")
    assert len(ids) == 2 and ids[0].endswith("_0") and ids[1].endswith("_1"), ids
    for job_id in ids:
        info = slurm.wait_job_done(job_id, 120)
        assert info["JobState"] == "COMPLETED", info
    run_dirs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.name != "slurm")
    assert [p.name for p in run_dirs] == ["000_lr-0.001", "001_lr-0.002"]
    for run_dir, lr in zip(run_dirs, (1e-3, 2e-3)):
        assert metric_steps(run_dir) == list(range(1, 7))
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()


INTERRUPTS = {
    # A job on a higher-priority partition needs the node: SLURM preempts ours (SIGTERM, grace time).
    "preemption": lambda slurm, job_id: slurm.run("sbatch", "--partition", "urgent", "--ntasks", "2",
                                                  "--output", "/dev/null", "--wrap", "sleep 1"),
    # What `#SBATCH --signal=USR2@<delay>` delivers ahead of the time limit, sent now instead of later.
    "time-limit warning": lambda slurm, job_id: slurm.run("scancel", "--signal=USR2", job_id),
}


@pytest.mark.parametrize("interrupt, tasks", [("preemption", 2), ("time-limit warning", 1)])
def test_interrupted_job_saves_requeues_and_resumes(slurm, repo_root, subprocess_env, tmp_path, interrupt, tasks):
    steps = 150
    run_dir = tmp_path / "run"
    backend = ["--backend", "ddp"] if tasks > 1 else []
    (job_id,) = launch(slurm, repo_root, subprocess_env, tmp_path, "--tasks-per-node", str(tasks), *backend,
                       "--partition", "debug", "--run-dir", str(run_dir), f"train.steps={steps}")
    slurm.wait_for(lambda: len(metric_steps(run_dir)) >= 20, 120, "the first 20 training steps")
    INTERRUPTS[interrupt](slurm, job_id)

    info = slurm.wait_job_done(job_id, 240)
    logs = {rank: "".join((run_dir / "slurm" / f"{job_id}_{rank}_log.{kind}").read_text() for kind in ("out", "err"))
            for rank in range(tasks)}
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, logs[0][-3000:])
    assert int(info["Restarts"]) >= 1, info
    train_log = (run_dir / "train.log").read_text()
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", train_log)]
    assert resumed and 20 <= resumed[0] < steps, train_log[-2000:]
    # Requeued by submitit's checkpoint path: SLURM's own requeue would wait for the 600 s grace time.
    assert "Calling checkpoint method" in logs[0] and f"Requeued job {job_id}" in logs[0], logs[0][-3000:]
    # every step logged exactly once: no gap, no repeat across the restart
    assert metric_steps(run_dir) == list(range(1, steps + 1))
    assert latest_checkpoint_step(run_dir) == steps
    for rank in range(tasks):
        assert f"rank {rank}/{tasks}" in logs[rank]


def test_srun_of_several_tasks_without_the_launcher_is_refused(slurm, repo_root, subprocess_env, tmp_path):
    """A plain `srun --ntasks 2 python -m scd_train.train` would start two runs that each think they are
    rank 0 of 1, writing into one directory: both tasks refuse, naming the SLURM variables."""
    config = tmp_path / "micro.yaml"
    config.write_text(MICRO_CONFIG)
    env = {**slurm.env, "PYTHONPATH": subprocess_env["PYTHONPATH"], "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["srun", "--ntasks", "2", "--partition", "debug", sys.executable, "-m", "scd_train.train",
                           "--config", str(config), f"train.run_dir={tmp_path / 'run'}"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("SLURM started this step with 2 tasks (SLURM_STEP_NUM_TASKS=2") == 2, done.stderr
    assert "SLURM_PROCID=0" in done.stderr and "SLURM_PROCID=1" in done.stderr
    assert not (tmp_path / "run").exists()
