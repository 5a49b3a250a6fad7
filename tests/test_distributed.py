"""Two-process CPU (gloo) runs of the fsdp2 and deepspeed (ZeRO-3) backends.

Per backend: a 20-step run matches the single-process run; a run SIGKILLed during a save resumes
from the previous complete checkpoint and ends exactly where an uninterrupted run ends, with the
right per-group learning rates; a damaged rank-1 file makes both ranks fall back to the older
checkpoint, and a changed optim.lr applies from there; resuming on one rank reshards (fsdp2) or
stops naming both world sizes (deepspeed). The uninterrupted deepspeed run uses the ``deepspeed``
launcher command of the README. A stop signal sent to one rank makes every rank save and exit cleanly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from scd_train.checkpoint import COMPLETE, CheckpointManager, step_of
from scd_train.config import load_config
from scd_train.models import build_model
from scd_train.optim import warmup_factor
from scd_train.weights import read_checkpoint_weights

TINY = [
    "model.width=32", "model.num_heads=2", "model.head_dim=16", "model.rope_axes=[4,6,6]",
    "model.encoder_layers=2", "model.decoder_layers=1", "model.layers=3", "model.max_frames=8",
    "data.clip_frames=4", "data.clip_stride=2", "data.batch_size=2", "data.synthetic.num_videos=16",
    "data.synthetic.frames_per_video=8", "optim.warmup_steps=5", "train.device=cpu", "train.precision=fp32",
    "log.every=1", "log.progress_bar=false", "log.wandb=disabled",
]
# fp32 on CPU: sharded and single-process runs differ only in reduction order.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
TIMEOUT = 240
BACKENDS = ["fsdp2", "deepspeed"]
RESUME_STEPS = 10
REPO = Path(__file__).resolve().parents[1]


class Launcher:
    def __init__(self, repo_root: Path, python: str, env: dict, tmp_path: Path) -> None:
        self.repo_root, self.python = repo_root, python
        self.env = {**env, "TMPDIR": str(tmp_path), "DS_ACCELERATOR": "cpu"}

    def torchrun(self, nproc: int, overrides: list[str], script: str | None = None) -> list[str]:
        entry = [script] if script else ["-m", "scd_train.train"]
        return [self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *entry,
                "--config", "configs/tiny.yaml", *TINY, *overrides]

    def deepspeed(self, nproc: int, overrides: list[str]) -> list[str]:
        launcher = str(Path(self.python).parent / "deepspeed")
        return [launcher, f"--num_gpus={nproc}", f"--master_port={free_port()}", "scd_train/train.py",
                "--config", "configs/tiny.yaml", *TINY, *overrides]

    def run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=self.repo_root, env=self.env, capture_output=True, text=True, timeout=TIMEOUT)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[:6])}... exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                                 f"{done.stderr[-5000:]}")
        return done

    def start(self, cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(cmd, cwd=self.repo_root, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir: Path) -> dict[int, dict]:
    """The last logged record of each step (a resumed run appends after the interrupted one)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record
    return out


def weights(run_dir: Path, checkpoint: Path | None = None, ema: bool = True) -> dict[str, torch.Tensor]:
    cfg = load_config(run_dir / "config.yaml")
    manager = CheckpointManager(run_dir / "checkpoints", 1, runtime=None)
    path = checkpoint or manager.complete_checkpoints()[-1]
    return read_checkpoint_weights(path, build_model(cfg.model), use_ema=ema)


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> float:
    names = [n for n in a if n.startswith(prefix)]
    assert names and set(names) <= set(b), f"weights differ in names: {sorted(set(a) ^ set(b))[:5]}"
    return max(float((a[n] - b[n]).detach().abs().max()) for n in names)


def expected_lrs(step: int, freeze_after: int | None = None) -> dict[str, float]:
    """configs/tiny.yaml: lr 1e-3, encoder ratio 1, decoder ratio 2; ``step`` is the 0-based index."""
    factor = warmup_factor(step, 5)
    encoder = 0.0 if freeze_after is not None and step >= freeze_after else 1e-3 * factor
    return {"lr/encoder": encoder, "lr/decoder": 2e-3 * factor}


def assert_logged_lrs(recs: dict[int, dict], steps, freeze_after: int | None = None) -> None:
    for step in steps:
        for key, want in expected_lrs(step - 1, freeze_after).items():
            assert math.isclose(recs[step][key], want, rel_tol=1e-9, abs_tol=1e-15), (step, key, recs[step][key])


@pytest.fixture
def launcher(repo_root, python_exe, subprocess_env, tmp_path) -> Launcher:
    return Launcher(repo_root, python_exe, subprocess_env, tmp_path)


MIRROR = ["train.steps=20", "train.checkpoint_every=15", "train.keep_checkpoints=2", "optim.freeze_encoder_after=15"]


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory) -> Path:
    """One process, 20 steps, the encoder frozen after step 15."""
    tmp = tmp_path_factory.mktemp("single")
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    cmd = [sys.executable, "-m", "scd_train.train", "--config", "configs/tiny.yaml", *TINY, *MIRROR,
           f"train.run_dir={tmp / 'run'}"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_match_single_process(backend, launcher, single_reference, tmp_path):
    run_dir = tmp_path / "run"
    launcher.run(launcher.torchrun(2, [*MIRROR, f"train.backend={backend}", f"train.run_dir={run_dir}"],
                                   script="tests/mirror_ranks.py"))
    ours, ref = records(run_dir), records(single_reference)
    assert sorted(ours) == list(range(1, 21))
    for step in ours:
        assert math.isclose(ours[step]["loss"], ref[step]["loss"], rel_tol=LOSS_RTOL), step
        assert math.isclose(ours[step]["grad_norm"], ref[step]["grad_norm"], rel_tol=LOSS_RTOL), step
    assert_logged_lrs(ours, range(1, 21), freeze_after=15)
    assert max_weight_diff(weights(run_dir), weights(single_reference)) < WEIGHT_ATOL
    assert max_weight_diff(weights(run_dir, ema=False), weights(single_reference, ema=False)) < WEIGHT_ATOL
    # freeze_encoder_after=15 under sharding: the encoder stops moving, the decoder does not.
    at_15 = weights(run_dir, run_dir / "checkpoints" / "step_00000015", ema=False)
    at_20 = weights(run_dir, ema=False)
    assert max_weight_diff(at_15, at_20, "encoder.") == 0.0
    assert max_weight_diff(at_15, at_20, "decoder.") > 1e-4


def kill_rank_during_save(launcher: Launcher, cmd: list[str], run_dir: Path, log: Path) -> int:
    """SIGKILL rank 1 while a checkpoint after step 2 is being written; returns that step."""
    proc = launcher.start(cmd, log)
    try:
        victim = worker_with_rank(proc, 1)
        checkpoints = run_dir / "checkpoints"
        while True:
            partial = [p for p in checkpoints.glob("step_*.partial")] if checkpoints.is_dir() else []
            if partial and step_of(partial[0]) >= 3:
                victim.send_signal(signal.SIGKILL)
                break
            assert proc.poll() is None, f"the run ended before a save could be interrupted:\n{log.read_text()[-3000:]}"
            time.sleep(0.002)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    return step_of(partial[0])


# A file of the checkpoint that only rank 1 writes, per backend.
RANK1_FILE = {"fsdp2": "state/__1_0.distcp",
              "deepspeed": "state/deepspeed/zero3/zero_pp_rank_1_mp_rank_00_optim_states.pt"}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def worker_with_rank(proc: subprocess.Popen, rank: int) -> psutil.Process:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "python" in child.name():
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        assert proc.poll() is None, "the launcher exited before its workers started"
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} appeared")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_during_save_then_resume_matches_uninterrupted(backend, launcher, tmp_path):
    common = [f"train.backend={backend}", f"train.steps={RESUME_STEPS}"]
    straight = tmp_path / "straight"
    args = [*common, f"train.run_dir={straight}", f"train.checkpoint_every={RESUME_STEPS}"]
    if backend == "deepspeed":  # the README's launcher command
        launcher.run(launcher.deepspeed(2, args))
    else:
        launcher.run(launcher.torchrun(2, args))

    killed = tmp_path / "killed"
    cmd = launcher.torchrun(2, [*common, f"train.run_dir={killed}", "train.checkpoint_every=1"])
    interrupted = kill_rank_during_save(launcher, cmd, killed, tmp_path / "killed.log")
    manager = CheckpointManager(killed / "checkpoints", 1, runtime=None)
    previous = manager.find_resumable()
    # The save being written when the kill was sent, or (had it just been finalized) that one.
    assert previous is not None and step_of(previous) in (interrupted - 1, interrupted), (previous, interrupted)
    assert (previous / COMPLETE).is_file()
    for partial in (killed / "checkpoints").glob("step_*.partial"):
        assert not (partial / COMPLETE).exists()
    start = step_of(previous)

    resumed = launcher.run(launcher.torchrun(2, [*common, f"train.run_dir={killed}",
                                                 f"train.checkpoint_every={RESUME_STEPS}"]))
    assert f"resumed from {previous} at step {start}" in resumed.stderr
    ours, ref = records(killed), records(straight)
    after = range(start + 1, RESUME_STEPS + 1)
    for step in after:
        assert math.isclose(ours[step]["loss"], ref[step]["loss"], rel_tol=1e-6), step
    assert_logged_lrs(ours, after)
    assert max_weight_diff(weights(killed), weights(straight)) < 1e-6
    assert max_weight_diff(weights(killed, ema=False), weights(straight, ema=False)) < 1e-6

    # Flipped bytes in a file only rank 1 wrote, and new learning rates: both ranks skip the damaged
    # checkpoint together, resume from the older intact one and train at the config's rates.
    newest, older = manager.complete_checkpoints()[-1], manager.complete_checkpoints()[-2]
    flip_a_byte(newest / RANK1_FILE[backend])
    again = launcher.run(launcher.torchrun(2, [*common, f"train.run_dir={killed}", f"train.steps={RESUME_STEPS + 2}",
                                               "optim.lr=2e-3"]))
    assert f"checkpoint {newest} is damaged and is skipped: {RANK1_FILE[backend]} has the right size" in again.stderr
    assert f"resumed from {older} at step {step_of(older)}" in again.stderr
    assert "optim.lr: 0.001 (checkpoint) -> 0.002 (now)" in again.stderr
    recs = records(killed)
    for step in range(step_of(older) + 1, RESUME_STEPS + 3):
        factor = warmup_factor(step - 1, 5)
        assert math.isclose(recs[step]["lr/encoder"], 2e-3 * factor, rel_tol=1e-9), step
        assert math.isclose(recs[step]["lr/decoder"], 4e-3 * factor, rel_tol=1e-9), step

    one_rank = launcher.run(launcher.torchrun(1, [*common, f"train.run_dir={straight}",
                                                  f"train.steps={RESUME_STEPS + 2}"]), check=False)
    if backend == "fsdp2":  # DCP reshards the 2-rank checkpoint onto 1 rank
        assert one_rank.returncode == 0, one_rank.stderr[-3000:]
        assert "resharded onto 1" in one_rank.stderr
        assert max(records(straight)) == RESUME_STEPS + 2
    else:
        assert one_rank.returncode != 0
        assert "written by 2 ranks but this run has 1" in one_rank.stderr


def test_stop_signal_on_one_rank_saves_on_all_and_exits(launcher, tmp_path):
    run_dir = tmp_path / "run"
    proc = launcher.start(launcher.torchrun(2, ["train.backend=ddp", "train.steps=100000", "train.checkpoint_every=0",
                                                f"train.run_dir={run_dir}"]), tmp_path / "run.log")
    try:
        rank1 = worker_with_rank(proc, 1)
        deadline = time.monotonic() + TIMEOUT
        while not ((run_dir / "metrics.jsonl").is_file() and len(records(run_dir)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.05)
        rank1.send_signal(signal.SIGUSR2)
        assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "run.log").read_text()
    assert "stopped at step" in log
    saved = CheckpointManager(run_dir / "checkpoints", 1, runtime=None).find_resumable()
    assert saved is not None and 3 <= step_of(saved) < 100000
    assert sorted(p.name for p in saved.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
