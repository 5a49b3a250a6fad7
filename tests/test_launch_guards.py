"""Launch and stop guards with real processes: a stop request ends a run that makes no progress,
launch variables are checked before any rendezvous, a missing peer is named within the rendezvous
time-out, and workers whose launcher was killed stop instead of training on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from scd_train.checkpoint import CheckpointManager, step_of

TINY = ["model.width=32", "model.num_heads=2", "model.head_dim=16", "model.rope_axes=[4,6,6]",
        "model.encoder_layers=1", "model.decoder_layers=1", "model.layers=2", "model.max_frames=8",
        "data.clip_frames=4", "data.clip_stride=2", "data.batch_size=2", "data.synthetic.num_videos=16",
        "data.synthetic.frames_per_video=8", "train.device=cpu", "train.precision=fp32", "log.every=1",
        "log.progress_bar=false", "log.wandb=disabled", "train.checkpoint_every=0"]
TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(python_exe: str, run_dir: Path, *overrides: str, script: list[str] | None = None) -> list[str]:
    return [python_exe, *(script or ["-m", "scd_train.train"]), "--config", "configs/tiny.yaml", *TINY,
            f"train.run_dir={run_dir}", *overrides]


def metric_count(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_stop_request_ends_a_run_that_reaches_no_step_boundary(repo_root, python_exe, subprocess_env, tmp_path):
    from stuck_data import STUCK_MARKER

    log = tmp_path / "stuck.log"
    cmd = train_command(python_exe, tmp_path / "run", "train.steps=10", "train.stop_grace_s=2",
                        script=["tests/stuck_data.py"])
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=repo_root, env=subprocess_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while STUCK_MARKER not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert "received signal 15 (SIGTERM)" in text
    assert "reached no step boundary since (train.stop_grace_s=2)" in text
    assert "the run is at step 0, its newest complete checkpoint is none" in text


def run_quick(cmd: list[str], repo_root: Path, env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=repo_root, env={**env, **extra}, capture_output=True, text=True, timeout=TIMEOUT)


def test_a_rank_outside_the_world_is_refused_before_any_rendezvous(repo_root, python_exe, subprocess_env, tmp_path):
    done = run_quick(train_command(python_exe, tmp_path / "run", "train.steps=2"), repo_root, subprocess_env,
                     RANK="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "scd-train: rank 2: RANK=2 is outside WORLD_SIZE=2 (ranks are 0..1)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_missing_peer_is_named_within_the_rendezvous_time_out(repo_root, python_exe, subprocess_env, tmp_path):
    """Rank 0 without rank 1, and rank 1 without rank 0, side by side on two ports."""
    alone = {}
    for rank in (0, 1):
        env = {**subprocess_env, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        cmd = train_command(python_exe, tmp_path / f"run{rank}", "train.steps=2", "train.rendezvous_timeout_s=4",
                            "train.backend=ddp")
        alone[rank] = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    outputs = {rank: proc.communicate(timeout=TIMEOUT) for rank, proc in alone.items()}
    err0, err1 = outputs[0][1], outputs[1][1]
    assert alone[0].returncode == 1 and alone[1].returncode == 1, (err0[-2000:], err1[-2000:])
    assert "rank 0: waiting for rank(s) 1 to join at 127.0.0.1:" in err0
    assert "scd-train: rank 0: rank(s) 1 did not join the rendezvous at 127.0.0.1:" in err0
    assert "within 4 s (train.rendezvous_timeout_s; 1 of 2 joined)" in err0
    assert "rank 1/2: waiting for rank 0 to open the rendezvous at 127.0.0.1:" in err1
    assert "scd-train: rank 1/2: rank 0 did not open the rendezvous" in err1


@pytest.mark.slow
def test_workers_of_a_killed_torchrun_save_and_stop(repo_root, python_exe, subprocess_env, tmp_path):
    """kill -9 of torchrun's process group leaves its workers (they run in sessions of their own):
    they notice the launcher is gone, save at the next step boundary together and exit."""
    run_dir = tmp_path / "run"
    cmd = [python_exe, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scd_train.train",
           "--config", "configs/tiny.yaml", *TINY, "train.backend=ddp", "train.steps=100000",
           f"train.run_dir={run_dir}"]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, cwd=repo_root, env=subprocess_env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while metric_count(run_dir) < 3:
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "python" in p.name()]
        assert len(workers) == 2
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        gone, alive = psutil.wait_procs(workers, timeout=90)
        assert not alive, f"workers still training after their launcher was killed:\n{log.read_text()[-3000:]}"
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()
    saved = CheckpointManager(run_dir / "checkpoints", 1).find_resumable()
    assert saved is not None and step_of(saved) >= 3
    assert sorted(p.name for p in saved.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    train_log = (run_dir / "train.log").read_text()
    assert "the launcher that started this process exited" in train_log
    assert f"saved checkpoint {saved}" in train_log


def test_a_stop_is_requested_when_a_deepspeed_style_launcher_above_dies(python_exe, subprocess_env, tmp_path):
    """The `deepspeed` command dies on SIGTERM while its workers train on: a worker watches the launcher
    processes above it and turns the exit of any of them into a stop request."""
    child_out = tmp_path / "child.out"
    child = (
        "import sys, time\n"
        "from scd_train.stopping import StopControl, launcher_ancestors\n"
        f"out = open({str(child_out)!r}, 'w', buffering=1)\n"
        "chain = launcher_ancestors()\n"
        "print('watching', [p.command.split()[1] for p in chain], file=out)\n"
        "with StopControl(0, watch=chain) as stop:\n"
        "    deadline = time.monotonic() + 60\n"
        "    while not stop.requested and time.monotonic() < deadline:\n"
        "        time.sleep(0.05)\n"
        "print('stop:', stop.reason, file=out)\n")
    launcher = tmp_path / "deepspeed"  # a launcher script of that name: what the `deepspeed` command is
    launcher.write_text(f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}])\n")
    proc = subprocess.Popen([python_exe, str(launcher)], env=subprocess_env)
    try:
        deadline = time.monotonic() + TIMEOUT
        while "watching" not in (child_out.read_text() if child_out.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert f"watching ['{launcher}']" in child_out.read_text()
        proc.kill()  # SIGKILL: the launcher is gone, its child is not
        proc.wait()
        while "stop:" not in child_out.read_text():
            assert time.monotonic() < deadline, child_out.read_text()
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"stop: the launcher that started this process exited (pid {proc.pid}" in child_out.read_text()
