"""Streaming generation: call counts per frame, guidance, and agreement between the two paths."""

import pytest
import torch

from scd_train.config import load_config
from scd_train.diffusion.sampling import SamplerSettings, euler_sigmas, generate, guided_velocity, new_stream
from scd_train.models import build_model


@pytest.fixture
def cfg():
    return load_config("configs/tiny.yaml", ["model.encoder_layers=2", "model.decoder_layers=1", "model.layers=3"])


def latents(cfg, batch, frames):
    m = cfg.model
    return torch.randn(batch, frames, m.latent_channels, m.latent_height, m.latent_width)


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda mod, inp, out: calls.append(1))
    return calls


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_scd_runs_one_encoder_call_and_t_decoder_calls_per_frame(cfg, cfg_scale):
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    encoder_blocks = count_calls(model.encoder.blocks[0])
    decoder_calls = count_calls(model.decoder)
    steps, unroll = 5, 4
    settings = SamplerSettings(steps=steps, cfg_scale=cfg_scale, cfg_mode="decoder")
    rollout = generate(model, latents(cfg, 2, 3), torch.randint(0, 4, (2, 7)), unroll, settings)
    assert rollout.frames.shape[1] == 3 + unroll
    # guidance batches both branches into the same call, so the counts do not double
    assert len(encoder_blocks) == unroll and len(decoder_calls) == steps * unroll
    assert rollout.counts.context == unroll and rollout.counts.denoise == steps * unroll


def test_dense_baseline_runs_every_layer_at_every_step(cfg):
    cfg.model.arch = "causal_dit"
    model = build_model(cfg.model).eval()
    last_block = count_calls(model.blocks[-1])
    steps, unroll = 4, 3
    rollout = generate(model, latents(cfg, 1, 2), None, unroll, SamplerSettings(steps=steps))
    # one prefill, T denoising passes per frame, and a commit pass for every frame but the last
    assert len(last_block) == 1 + unroll * steps + (unroll - 1)
    assert rollout.counts.denoise == steps * unroll


def test_euler_schedule_and_guidance_formula():
    sigmas = euler_sigmas(50)
    assert sigmas[0] == 1.0 and sigmas[-2] == pytest.approx(0.001) and sigmas[-1] == 0.0 and len(sigmas) == 51
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert guided_velocity(cond, uncond, 1.0) == cond
    assert guided_velocity(cond, uncond, 3.0) == torch.tensor([4.0])


def test_streaming_next_frame_equals_batch_generate(cfg):
    """The interactive API (actions arriving one at a time) gives the same frames as generate()."""
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    context, actions = latents(cfg, 1, 2), torch.randint(0, 4, (1, 5))
    settings = SamplerSettings(steps=3)
    batch = generate(model, context, actions, 3, settings, torch.Generator().manual_seed(1))
    stream = new_stream(model, settings, 1, 5, torch.Generator().manual_seed(1))
    stream.prefill(context, actions[:, :2])
    frames = [stream.next_frame(actions[:, 2 + i]) for i in range(3)]
    assert torch.allclose(batch.frames[:, 2:], torch.stack(frames, 1), atol=1e-5)


def test_action_guidance_needs_actions(cfg):
    cfg.model.num_actions = 0
    model = build_model(cfg.model)
    with pytest.raises(ValueError, match="cfg_mode='action'"):
        new_stream(model, SamplerSettings(cfg_scale=2.0, cfg_mode="action"), 1, 4)
