"""Two-process CPU (gloo) distillation under FSDP2 and DeepSpeed ZeRO-3 against one process.

Both ranks read the same clips and draw the same noise (tests/mirror_distill_ranks.py), so the
sharded run must reproduce the single-process run: the same loss and gradient norm at every
step and the same student weights, EMA and raw. The runs train on the student's own rollouts, so
the streaming sampler also runs inside the sharded model's forward.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scd_train.config import load_config
from scd_train.models import build_model
from scd_train.trainer import Trainer
from scd_train.weights import read_checkpoint_weights

TINY = ["model.width=32", "model.num_heads=2", "model.head_dim=16", "model.rope_axes=[4,6,6]",
        "model.encoder_layers=2", "model.decoder_layers=1", "model.layers=3", "model.max_frames=8",
        "data.clip_frames=4", "data.clip_stride=2", "data.batch_size=2", "data.synthetic.num_videos=16",
        "data.synthetic.frames_per_video=8", "train.device=cpu", "train.precision=fp32", "log.progress_bar=false",
        "log.wandb=disabled", "diffusion.sample_steps=4"]
DISTILL = ["--steps", "2", "train.steps=6", "train.checkpoint_every=6", "log.every=1", "optim.warmup_steps=2",
           "distill.self_rollout=true", "distill.rollout_context_frames=2"]
TIMEOUT = 300
REPO = Path(__file__).resolve().parents[1]


def env_for(tmp: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", OMP_NUM_THREADS="1", TMPDIR=str(tmp),
                DS_ACCELERATOR="cpu")


def run(cmd: list[str], tmp: Path) -> None:
    done = subprocess.run(cmd, cwd=REPO, env=env_for(tmp), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(cmd[:6])}... exited {done.returncode}:\n{done.stderr[-5000:]}"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    Trainer(load_config("configs/tiny.yaml", [*TINY, "train.steps=8", f"train.run_dir={run_dir}"])).run()
    return run_dir


@pytest.fixture(scope="module")
def single_reference(teacher, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "student"
    run([sys.executable, "-m", "scd_train.distill", str(teacher), "--out", str(out), *DISTILL], tmp)
    return out


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def student_weights(run_dir: Path, ema: bool) -> dict[str, torch.Tensor]:
    cfg = load_config(run_dir / "config.yaml")
    return read_checkpoint_weights(run_dir / "checkpoints" / "step_00000006", build_model(cfg.model), use_ema=ema)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_two_rank_distillation_matches_one_process(backend, teacher, single_reference, tmp_path):
    out = tmp_path / "student"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "tests/mirror_distill_ranks.py", str(teacher), "--out", str(out), *DISTILL, f"train.backend={backend}"],
        tmp_path)
    ours, ref = records(out), records(single_reference)
    assert sorted(ours) == sorted(ref) == list(range(1, 7))
    for step in ours:
        assert math.isclose(ours[step]["loss"], ref[step]["loss"], rel_tol=1e-5), step
        assert math.isclose(ours[step]["grad_norm"], ref[step]["grad_norm"], rel_tol=1e-5), step
        assert "lr/decoder" in ours[step] and "lr/encoder" not in ours[step]  # the encoder stays frozen
    for ema in (True, False):
        a, b = student_weights(out, ema), student_weights(single_reference, ema)
        assert set(a) == set(b)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
