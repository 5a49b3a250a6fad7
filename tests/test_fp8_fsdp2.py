"""torchao float8 under FSDP2: two CPU processes (gloo) against one process, and DCP resume.

Both ranks read the same clips and draw the same noise (tests/mirror_ranks.py), so the sharded run
must reproduce the single-process FP8 run. Dynamic float8 scales come from the whole tensor (for
sharded weights, an all-reduced amax), so the only differences are fp32 reduction order and the
rare float8 rounding flip it causes: losses agree to 1e-4 relative.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from scd_train.config import load_config
from scd_train.trainer import Trainer

pytest.importorskip("torchao.float8", reason="torchao is a declared dependency; its float8 module is needed")

TINY = [
    "model.width=32", "model.num_heads=2", "model.head_dim=16", "model.rope_axes=[4,6,6]",
    "model.encoder_layers=2", "model.decoder_layers=1", "model.layers=3", "model.max_frames=8",
    "data.clip_frames=4", "data.clip_stride=2", "data.batch_size=2", "data.synthetic.num_videos=16",
    "data.synthetic.frames_per_video=8", "optim.warmup_steps=0", "train.device=cpu", "train.precision=fp32",
    "log.every=1", "log.progress_bar=false", "log.wandb=disabled", "train.checkpoint_every=2",
    "precision.fp8.enabled=true", "precision.fp8.backend=torchao", "precision.fp8.cpu_emulation=true",
    "precision.fp8.modules=[all]",
]
LOSS_RTOL = 1e-4
TIMEOUT = 240


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, request) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("fp8_single") / "run"
    cfg = load_config(request.config.rootpath / "configs" / "tiny.yaml", [*TINY, "train.steps=6",
                                                                           f"train.run_dir={run_dir}"])
    Trainer(cfg).run()
    return losses(run_dir)


def torchrun(repo_root: Path, env: dict, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tests/mirror_ranks.py", "--config", "configs/tiny.yaml", *TINY, "train.backend=fsdp2", *overrides]
    done = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


@pytest.mark.parametrize("float8_all_gather", [False, True])
def test_fsdp2_float8_matches_one_process(float8_all_gather, repo_root, subprocess_env, tmp_path, single_process):
    """Both weight all-gather modes; the float8 one also resumes from its DCP checkpoint (the float8
    weight wrapper inside the DTensor shards is the harder case to save and load)."""
    env = {**subprocess_env, "TMPDIR": str(tmp_path)}
    run_dir = tmp_path / "run"
    common = [f"precision.fp8.fsdp_float8_all_gather={str(float8_all_gather).lower()}", f"train.run_dir={run_dir}"]
    torchrun(repo_root, env, [*common, "train.steps=4"])
    steps = 4
    if float8_all_gather:
        torchrun(repo_root, env, [*common, "train.steps=6"])  # resumes from the step-4 checkpoint
        steps = 6
        log = (run_dir / "train.log").read_text()
        assert "resumed from" in log and "step_00000004" in log
    ours = losses(run_dir)
    assert sorted(ours) == list(range(1, steps + 1))
    for step, loss in ours.items():
        assert math.isclose(loss, single_process[step], rel_tol=LOSS_RTOL), (step, loss, single_process[step])
    assert "FP8 via torchao, recipe current (CPU emulation" in (run_dir / "train.log").read_text()
