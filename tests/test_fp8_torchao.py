"""torchao float8 training end to end on CPU (torchao's emulation mode: real float8 casts).

Tolerances: one e4m3 cast has a relative rounding error of at most 2^-4 (3 mantissa bits), and
e5m2 gradients 2^-3; over a few small layers the loss stays within 2 % of fp32 and each weight
gradient keeps a cosine similarity above 0.98 with its fp32 counterpart.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from scd_train.config import load_config
from scd_train.diffusion.objective import build_objective
from scd_train.ema import canonical_name
from scd_train.models import build_model
from scd_train.parallel.runtime import Runtime
from scd_train.precision import prepare_fp8
from scd_train.trainer import Trainer

pytest.importorskip("torchao.float8", reason="torchao is a declared dependency; its float8 module is needed")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

CPU_RUNTIME = Runtime(0, 1, 0, torch.device("cpu"))
SMALL = ["model.width=32", "model.num_heads=2", "model.head_dim=16", "model.rope_axes=[4,6,6]",
         "model.encoder_layers=2", "model.decoder_layers=1", "model.layers=3", "data.batch_size=2",
         "data.clip_frames=4", "data.clip_stride=4", "data.synthetic.num_videos=16",
         "data.synthetic.frames_per_video=8", "optim.warmup_steps=0", "optim.lr=3e-3", "log.every=1",
         "log.wandb=disabled", "log.progress_bar=false", "train.checkpoint_every=2", "train.precision=fp32"]
FP8 = ["precision.fp8.enabled=true", "precision.fp8.backend=torchao", "precision.fp8.cpu_emulation=true"]


def make_config(repo_root, *overrides):
    return load_config(repo_root / "configs" / "tiny.yaml", [*SMALL, *overrides])


def test_selected_layers_become_float8_and_names_do_not_change(repo_root):
    cfg = make_config(repo_root, *FP8, "precision.fp8.modules=[encoder,decoder.blocks.0.mlp.*]")
    model = build_model(cfg.model)
    names_before = [n for n, _ in model.named_parameters()]
    fp8 = prepare_fp8(model, cfg, CPU_RUNTIME)
    float8 = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert float8 == sorted(fp8.fp8_layers)
    assert "decoder.blocks.0.mlp.0" in float8 and "decoder.blocks.0.qkv" not in float8
    assert len(float8) == 2 * 4 + 2
    assert type(model.encoder.blocks[0].attn_modulation) is nn.Linear
    assert type(model.decoder.proj_out) is nn.Linear
    assert [n for n, _ in model.named_parameters()] == names_before
    assert model.encoder.blocks[0].qkv.config.emulate is True
    assert fp8.summary()["emulated"] is True


def _randomize(model: nn.Module) -> None:
    """Leave no zero-initialised gate or output layer, so every FP8 layer affects the loss."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _loss_and_grads(model: nn.Module, cfg, latents, actions) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(2)
    model.zero_grad()
    out = build_objective(cfg.model, cfg.diffusion)(model, latents, actions)
    out.loss.backward()
    return out.loss.item(), {canonical_name(n): p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def test_float8_loss_and_gradients_track_fp32(repo_root):
    cfg = make_config(repo_root, *FP8, "precision.fp8.modules=[all]")
    reference = build_model(cfg.model)
    _randomize(reference)
    converted = copy.deepcopy(reference)
    prepare_fp8(converted, cfg, CPU_RUNTIME)
    torch.manual_seed(3)
    latents = torch.randn(2, 4, cfg.model.latent_channels, 8, 8)
    actions = torch.randint(0, 4, (2, 4))
    ref_loss, ref_grads = _loss_and_grads(reference, cfg, latents, actions)
    fp8_loss, fp8_grads = _loss_and_grads(converted, cfg, latents, actions)
    assert fp8_loss == pytest.approx(ref_loss, rel=0.02)
    assert fp8_loss != ref_loss  # the float8 casts are really in the path
    for name in ("encoder.blocks.0.qkv.weight", "encoder.blocks.1.mlp.2.weight", "decoder.blocks.0.mlp.0.weight"):
        cosine = torch.nn.functional.cosine_similarity(fp8_grads[name].flatten(), ref_grads[name].flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))
        assert not torch.equal(fp8_grads[name], ref_grads[name])


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory, request):
    repo_root = request.config.rootpath
    run_dir = tmp_path_factory.mktemp("fp32")
    return Trainer(make_config(repo_root, "train.steps=4", f"train.run_dir={run_dir}")).run().losses


def test_trainer_runs_fp8_close_to_fp32_and_resumes_exactly(repo_root, tmp_path, fp32_losses):
    # All blocks in FP8: with adaLN-zero, the decoder's blocks reach the loss by step 3, the encoder's later.
    everywhere = [*FP8, "precision.fp8.modules=[all]"]
    straight = Trainer(make_config(repo_root, *everywhere, "train.steps=4", f"train.run_dir={tmp_path / 'straight'}"))
    assert isinstance(straight.backend.model.encoder.blocks[1].mlp[2], Float8Linear)
    assert isinstance(straight.backend.model.decoder.blocks[0].qkv, Float8Linear)
    straight_losses = straight.run().losses
    for (step, fp8_loss), (_, ref_loss) in zip(straight_losses, fp32_losses, strict=True):
        assert fp8_loss == pytest.approx(ref_loss, rel=0.02), step
    assert straight_losses[-1][1] != fp32_losses[-1][1]  # float8 really ran

    split_dir = tmp_path / "split"
    Trainer(make_config(repo_root, *everywhere, "train.steps=2", f"train.run_dir={split_dir}")).run()
    resumed = Trainer(make_config(repo_root, *everywhere, "train.steps=4", f"train.run_dir={split_dir}"))
    assert resumed.resumed_from is not None and resumed.state.step == 2
    assert resumed.run().losses == straight_losses[2:]

    # FP8 checkpoints hold plain linear weights: a high-precision run resumes from them.
    plain = Trainer(make_config(repo_root, "train.steps=4", f"train.run_dir={split_dir}"))
    assert plain.resumed_from is not None
    for (name, p), q in zip(plain.backend.model.named_parameters(), resumed.backend.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_float8_with_activation_checkpointing_gives_the_same_gradients(repo_root):
    """torchao's scales are recomputed from the tensors, so recomputation in backward is exact."""
    from scd_train.parallel.checkpointing import apply_activation_checkpointing

    cfg = make_config(repo_root, *FP8, "precision.fp8.modules=[all]")
    model = build_model(cfg.model)
    _randomize(model)
    prepare_fp8(model, cfg, CPU_RUNTIME)
    checkpointed = copy.deepcopy(model)
    assert apply_activation_checkpointing(checkpointed) == 3
    latents, actions = torch.randn(2, 4, cfg.model.latent_channels, 8, 8), torch.randint(0, 4, (2, 4))
    loss, grads = _loss_and_grads(model, cfg, latents, actions)
    ac_loss, ac_grads = _loss_and_grads(checkpointed, cfg, latents, actions)
    assert ac_loss == loss
    assert ac_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ac_grads[name], grad, rtol=0, atol=0)
