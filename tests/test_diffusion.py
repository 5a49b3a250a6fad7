"""Flow matching, timestep/clean-mask sampling, loss masking and the multi-draw objective."""

import dataclasses

import torch

from scd_train.config import load_config
from scd_train.diffusion.flow import (
    add_noise,
    masked_clip_mean,
    sample_clean_mask,
    sample_timesteps,
    sigmas_from_timesteps,
    velocity_target,
)
from scd_train.diffusion.objective import build_objective
from scd_train.models import build_model


def test_rectified_flow_interpolates_and_velocity_points_from_data_to_noise():
    x0, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt = add_noise(x0, eps, s)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[3], eps[3])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    v = velocity_target(x0, eps)
    # integrating dx/ds = v from s to 1 lands on the noise
    assert torch.allclose(xt + (1 - s).view(-1, 1, 1, 1) * v, eps, atol=1e-6)


def test_timesteps_are_integer_in_range_and_logit_normal_centred():
    torch.manual_seed(0)
    t = sample_timesteps((20000,), 1000, 0.0, 1.0, torch.device("cpu"))
    assert t.dtype == torch.float32
    assert torch.equal(t, t.round()) and t.min() >= 1 and t.max() <= 1000
    assert abs(float(t.float().median()) - 500) < 15
    shifted = sample_timesteps((20000,), 1000, 1.0, 1.0, torch.device("cpu"))
    assert shifted.float().median() < t.float().median()  # higher u -> smaller timestep in the descending table
    assert torch.equal(sigmas_from_timesteps(torch.tensor([-1.0, 1000.0]), 1000), torch.tensor([0.0, 1.0]))


def test_clean_mask_keeps_frame_zero_clean_and_matches_ratio():
    torch.manual_seed(0)
    clean = sample_clean_mask(4000, 10, 0.1, torch.device("cpu"))
    assert clean[:, 0].all()
    assert abs(float(clean[:, 1:].float().mean()) - 0.1) < 0.01


def test_loss_is_masked_per_clip_then_averaged():
    frame_loss = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    # clip 0: mean of 1 and 3; clip 1 has no noised frame and contributes 0
    assert torch.allclose(masked_clip_mean(frame_loss, mask), torch.tensor(1.0))


def tiny_cfg(*overrides):
    return load_config("configs/tiny.yaml", ["model.encoder_layers=1", "model.decoder_layers=1", "model.layers=2",
                                             *overrides])


def test_decoder_multi_batch_runs_encoder_once_and_decoder_once_on_k_draws():
    cfg = tiny_cfg("diffusion.decoder_multi_batch=3")
    model = build_model(cfg.model)
    with torch.no_grad():  # past the zero init, so gradient reaches the encoder through the decoder
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    calls = {"encoder": [], "decoder": []}
    model.encoder.register_forward_hook(lambda m, i, o: calls["encoder"].append(i[0].shape[0]))
    model.decoder.register_forward_hook(lambda m, i, o: calls["decoder"].append(i[0].shape[0]))
    m = cfg.model
    latents = torch.randn(2, 5, m.latent_channels, m.latent_height, m.latent_width)
    out = build_objective(cfg.model, cfg.diffusion)(model, latents, torch.randint(0, 4, (2, 5)))
    assert calls["encoder"] == [2]
    assert calls["decoder"] == [3 * 2 * 4]  # K draws x clips x target frames 1..4
    out.loss.backward()
    encoder_grad = sum(float(p.grad.abs().sum()) for p in model.encoder.parameters() if p.grad is not None)
    assert encoder_grad > 0


def test_initial_loss_matches_unit_variance_target():
    """Zero decoder output at init makes the loss E|eps - x0|^2 = 1 + E[x0^2] per element."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg.model)
    m = cfg.model
    latents = torch.randn(4, 6, m.latent_channels, m.latent_height, m.latent_width) * 0.5
    loss = build_objective(cfg.model, cfg.diffusion)(model, latents, None).loss.detach()
    assert abs(float(loss) - 1.25) < 0.05


def test_dense_objective_masks_clean_frames():
    torch.manual_seed(0)
    cfg = tiny_cfg("model.arch=causal_dit", "diffusion.clean_context_ratio=0.0")
    model = build_model(cfg.model)
    m = cfg.model
    latents = torch.zeros(2, 4, m.latent_channels, m.latent_height, m.latent_width)
    out = build_objective(cfg.model, cfg.diffusion)(model, latents, None)
    # frame 0 is always clean and never a target; the other 3 are all noised with ratio 0
    assert float(out.noised_fraction) == 1.0
    assert abs(out.loss.item() - 1.0) < 0.05
    everything_clean = build_objective(cfg.model, dataclasses.replace(cfg.diffusion, clean_context_ratio=1.0))
    out = everything_clean(model, latents, None)
    assert float(out.noised_fraction) == 0.0 and float(out.loss) == 0.0
