"""Transformer Engine FP8 path; runs only where TE imports and an FP8-capable GPU is present.

TE has no CPU build: on a CPU-only machine ``pip install transformer-engine[pytorch]`` cannot
build its extension (no CUDA/NCCL/cuDNN headers) and the prebuilt core fails to load cuDNN, so
these tests skip there with that reason. Everything around TE (selection, pre-flight, config,
extra-state checkpointing) is tested on CPU in test_fp8.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from scd_train.config import load_config
from scd_train.diffusion.objective import build_objective
from scd_train.models import build_model
from scd_train.parallel.runtime import Runtime
from scd_train.precision import prepare_fp8
from scd_train.trainer import Trainer


def _te_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "Transformer Engine needs a CUDA GPU (it has no CPU build); none is visible"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"FP8 needs compute capability >= 8.9; this GPU has {torch.cuda.get_device_capability()}"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:
        return f"Transformer Engine is not installed/importable here ({type(exc).__name__}: {exc})"
    return None


REASON = _te_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))

SMALL = ["model.width=128", "model.num_heads=2", "model.head_dim=64", "model.rope_axes=[16,24,24]",
         "model.encoder_layers=2", "model.decoder_layers=1", "model.layers=3", "data.batch_size=2",
         "data.clip_frames=4", "data.clip_stride=4", "data.synthetic.num_videos=16",
         "data.synthetic.frames_per_video=8", "log.every=1", "log.wandb=disabled", "log.progress_bar=false",
         "train.device=cuda", "train.precision=bf16", "train.checkpoint_every=2"]
TE = ["precision.fp8.enabled=true", "precision.fp8.backend=te"]


def make_config(repo_root, *overrides):
    return load_config(repo_root / "configs" / "tiny.yaml", [*SMALL, *overrides])


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_te_layers_replace_the_selection_and_track_bf16(repo_root, recipe):
    import transformer_engine.pytorch as te

    cfg = make_config(repo_root, *TE, f"precision.fp8.recipe={recipe}", "precision.fp8.modules=[all]")
    runtime = Runtime(0, 1, 0, torch.device("cuda", 0))
    reference = build_model(cfg.model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    converted = copy.deepcopy(reference)
    fp8 = prepare_fp8(converted, cfg, runtime)
    assert all(isinstance(dict(converted.named_modules())[n], te.Linear) for n in fp8.fp8_layers)
    assert [n for n, _ in converted.named_parameters()] == [n for n, _ in reference.named_parameters()]
    reference.cuda()
    converted.cuda()
    latents = torch.randn(2, 4, cfg.model.latent_channels, 8, 8, device="cuda")
    actions = torch.randint(0, 4, (2, 4), device="cuda")
    losses = []
    for model, context in ((reference, None), (converted, fp8.autocast)):
        torch.manual_seed(0)
        with torch.autocast("cuda", dtype=torch.bfloat16), (context() if context else torch.enable_grad()):
            loss = build_objective(cfg.model, cfg.diffusion)(model, latents, actions).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.05)


def test_te_delayed_scaling_state_round_trips_through_dcp(repo_root, tmp_path):
    cfg = make_config(repo_root, *TE, "precision.fp8.recipe=delayed", "train.activation_checkpointing=true",
                      "train.steps=2", f"train.run_dir={tmp_path}")
    trainer = Trainer(cfg)
    trainer.run()
    meta = trainer.backend.model.encoder.blocks[0]._checkpoint_wrapped_module.qkv.fp8_meta["scaling_fwd"]
    saved_scale, saved_history = meta.scale.clone(), meta.amax_history.clone()
    assert saved_history.abs().sum() > 0  # amaxes were recorded by the FP8 steps
    resumed = Trainer(make_config(repo_root, *TE, "precision.fp8.recipe=delayed",
                                  "train.activation_checkpointing=true", "train.steps=4", f"train.run_dir={tmp_path}"))
    assert resumed.state.step == 2
    restored = resumed.backend.model.encoder.blocks[0]._checkpoint_wrapped_module.qkv.fp8_meta["scaling_fwd"]
    assert torch.equal(restored.scale, saved_scale)
    assert torch.equal(restored.amax_history, saved_history)
    assert len(resumed.run().losses) == 2
