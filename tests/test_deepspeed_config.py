"""The DeepSpeed JSON generated from our config, and what a user-supplied JSON may change."""

from __future__ import annotations

import json

import pytest

from scd_train.config import load_config
from scd_train.parallel.deepspeed_config import build_deepspeed_config
from scd_train.parallel.reshard import reshard_loader_state


def config_with(tmp_path, user: dict | None, *overrides: str):
    extra = []
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        extra.append(f"train.deepspeed_config={path}")
    return load_config("configs/tiny.yaml", ["train.backend=deepspeed", "train.grad_accum=2", *overrides, *extra])


def test_generated_config_follows_run_config(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    ds = build_deepspeed_config(config_with(tmp_path, None, "optim.grad_clip=0.5"), bf16=True)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"] == {"enabled": True} and "optimizer" not in ds and "scheduler" not in ds


def test_user_json_is_merged(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    user = {"zero_optimization": {"stage3_prefetch_bucket_size": 1000}, "gradient_accumulation_steps": 2}
    ds = build_deepspeed_config(config_with(tmp_path, user), bf16=False)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                       "stage3_prefetch_bucket_size": 1000}


@pytest.mark.parametrize(("user", "message"), [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "has a 'optimizer' block"),
    ({"scheduler": {"type": "WarmupLR"}}, "has a 'scheduler' block"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 but the run config implies 2"),
    ({"train_batch_size": 64}, "sets train_batch_size"),
])
def test_user_json_that_would_override_our_training_is_refused(tmp_path, repo_root, monkeypatch, user, message):
    monkeypatch.chdir(repo_root)
    with pytest.raises(ValueError, match=message) as err:
        build_deepspeed_config(config_with(tmp_path, user), bf16=False)
    assert "ds.json" in str(err.value)


def test_missing_user_json_is_named(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    cfg = load_config("configs/tiny.yaml", [f"train.deepspeed_config={tmp_path / 'nope.json'}"])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_deepspeed_config(cfg, bf16=False)


def test_data_position_carries_over_to_another_world_size():
    state = {"epoch": 3, "batch_in_epoch": 5, "batch_size": 4, "world_size": 2, "seed": 0}
    assert reshard_loader_state(state, 1) == {**state, "world_size": 1, "batch_in_epoch": 10}
    assert reshard_loader_state(state, 4)["batch_in_epoch"] == 3  # 40 clips -> 2.5 batches of 16, rounded up
    with pytest.raises(ValueError, match="from 2 to 3 ranks"):
        reshard_loader_state({"shard": 1, "world_size": 2}, 3)
