"""The single-process trainer: learning, parameter groups, EMA, checkpoints and exact resume."""

import json
import os

import pytest
import torch

from scd_train.checkpoint import is_complete
from scd_train.config import load_config
from scd_train.models import build_model
from scd_train.optim import build_param_groups, check_learning_rates, set_learning_rates
from scd_train.trainer import Trainer
from scd_train.weights import read_checkpoint_weights

SMALL = ["model.width=64", "model.num_heads=2", "model.head_dim=32", "model.rope_axes=[8,12,12]",
         "model.encoder_layers=1", "model.decoder_layers=1", "model.layers=2",
         "data.synthetic.num_videos=24", "data.synthetic.frames_per_video=8", "data.clip_frames=4",
         "data.clip_stride=2", "data.batch_size=4", "log.every=2", "log.progress_bar=false",
         "log.wandb=disabled", "optim.warmup_steps=3", "optim.ema_decay=0.5"]


def small_cfg(run_dir, *overrides):
    return load_config("configs/tiny.yaml", [*SMALL, f"train.run_dir={run_dir}", *overrides])


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.backend.module.state_dict().items()}


def test_every_parameter_is_in_exactly_one_group_with_its_learning_rate():
    cfg = load_config("configs/tiny.yaml", ["optim.lr=1e-3", "optim.encoder_lr_ratio=0.5",
                                            "optim.decoder_lr_ratio=2.0", "optim.weight_decay=0.1",
                                            "optim.warmup_steps=10"])
    model = build_model(cfg.model)
    groups = build_param_groups(model, cfg.optim)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for _ in model.parameters())
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"encoder", "encoder_no_decay", "decoder", "decoder_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        assert all(names[id(p)].startswith(g["module"] + ".") for p in g["params"])
    optimizer = torch.optim.AdamW(groups)
    lrs = set_learning_rates(optimizer, 4, cfg.optim)
    assert lrs["encoder"] == pytest.approx(0.5e-3 * 5 / 10) and lrs["decoder"] == pytest.approx(2e-3 * 5 / 10)
    assert by_name["decoder_no_decay"]["weight_decay"] == 0.0 and by_name["decoder"]["weight_decay"] == 0.1
    optimizer.param_groups[0]["lr"] *= 3
    with pytest.raises(ValueError, match=optimizer.param_groups[0]["name"]):
        check_learning_rates(optimizer, 4, cfg.optim)


def test_freezing_the_encoder_zeroes_its_learning_rate_only():
    cfg = load_config("configs/tiny.yaml", ["optim.freeze_encoder_after=5", "optim.warmup_steps=0"])
    optimizer = torch.optim.AdamW(build_param_groups(build_model(cfg.model), cfg.optim))
    assert set_learning_rates(optimizer, 4, cfg.optim)["encoder"] > 0
    lrs = set_learning_rates(optimizer, 5, cfg.optim)
    assert lrs["encoder"] == 0.0 and lrs["decoder"] > 0


def test_loss_goes_down_on_the_tiny_config(tmp_path):
    torch.set_num_threads(2)
    cfg = small_cfg(tmp_path / "run", "train.steps=60", "optim.lr=2e-3", "train.checkpoint_every=0")
    result = Trainer(cfg).run()
    first, last = result.losses[0][1], result.losses[-1][1]
    assert result.status == "finished" and result.step == 60
    assert last < 0.8 * first
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(2, 61, 2))
    for key in ("lr/encoder", "lr/decoder", "perf/latent_frames_per_s", "perf/tflops", "perf/data_wait_share",
                "grad_norm"):
        assert key in records[-1], key
    assert (tmp_path / "run" / "config.yaml").exists()
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert torch.__version__.startswith(env["libraries"]["torch"])


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    straight = Trainer(small_cfg(tmp_path / "a", "train.steps=6", "train.checkpoint_every=0"))
    straight.run()
    first = Trainer(small_cfg(tmp_path / "b", "train.steps=3", "train.checkpoint_every=0"))
    first.run()
    resumed = Trainer(small_cfg(tmp_path / "b", "train.steps=6", "train.checkpoint_every=0"))
    assert resumed.resumed_from is not None and resumed.state.step == 3
    resumed.run()
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(straight.ema.shadow, resumed.ema.shadow))
    assert straight.state.samples_seen == resumed.state.samples_seen == 24
    logged = {name: {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").open())}
              for name in ("a", "b")}
    # the interrupted run also logged its last step (3); windows ending at 2 and 6 cover the same steps
    assert sorted(logged["b"]) == [2, 3, 4, 6]
    assert logged["a"][2] == logged["b"][2] and logged["a"][6] == logged["b"][6]


def test_incomplete_checkpoint_is_skipped_and_retention_keeps_the_newest(tmp_path):
    cfg = small_cfg(tmp_path / "run", "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    Trainer(cfg).run()
    root = tmp_path / "run" / "checkpoints"
    complete = sorted(p.name for p in root.iterdir() if p.is_dir() and is_complete(p))
    assert complete == ["step_00000003", "step_00000004"]
    assert (root / "latest").read_text().strip() == "step_00000004"
    # a save killed before its completion marker: newer, but must not be resumed from
    broken = root / "step_00000009"
    broken.mkdir()
    (broken / "state").mkdir()
    resumed = Trainer(small_cfg(tmp_path / "run", "train.steps=5"))
    assert resumed.resumed_from.name == "step_00000004"


def test_ema_weights_differ_from_raw_and_are_what_export_reads(tmp_path):
    trainer = Trainer(small_cfg(tmp_path / "run", "train.steps=4", "train.checkpoint_every=4"))
    trainer.run()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    model = build_model(trainer.cfg.model)
    ema = read_checkpoint_weights(ckpt, model, use_ema=True)
    raw = read_checkpoint_weights(ckpt, model, use_ema=False)
    live = trainer.backend.module.state_dict()
    name = "decoder.proj_out.weight"
    assert torch.equal(raw[name], live[name])
    assert not torch.equal(ema[name], raw[name])
    assert torch.equal(ema[name], dict(zip(trainer.ema.names, trainer.ema.shadow))[name])


def test_nonfinite_loss_stops_with_step_and_samples(tmp_path, monkeypatch):
    trainer = Trainer(small_cfg(tmp_path / "run", "train.steps=3", "train.checkpoint_every=0"))
    original = trainer.objective.__class__.__call__

    def poisoned(self, model, latents, actions):
        out = original(self, model, latents, actions)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.objective.__class__, "__call__", poisoned)
    with pytest.raises(Exception, match=r"non-finite.*step 0.*samples"):
        trainer.run()
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


def test_sigterm_saves_and_stops_at_a_step_boundary(tmp_path):
    trainer = Trainer(small_cfg(tmp_path / "run", "train.steps=50", "train.checkpoint_every=0"))
    original = trainer._train_step

    def step_then_signal(*args):
        record = original(*args)
        if trainer.state.step == 2:
            os.kill(os.getpid(), 15)
        return record

    trainer._train_step = step_then_signal
    result = trainer.run()
    assert result.status == "stopped" and result.step == 2
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
