"""Architecture facts from the spec: parameter counts, masks, init, causality, KV-cache parity."""

import pytest
import torch

from scd_train.config import load_config
from scd_train.models import build_model
from scd_train.models.attention import frame_block_causal_mask
from scd_train.models.block import DiTBlock


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_scd_m_parameter_counts_match_the_paper_model():
    cfg = load_config("configs/scd_m.yaml")
    with torch.device("meta"):
        model = build_model(cfg.model)
        block = DiTBlock(1024, 16, 64, 4.0)
    assert count(block) == 18_889_856
    assert round(count(model.encoder) / 1e6, 2) == 154.57
    assert round(count(model.decoder) / 1e6, 2) == 79.04


def test_dense_baseline_has_twelve_blocks_of_the_same_width():
    cfg = load_config("configs/causal_dit_m.yaml")
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert len(model.blocks) == 12
    assert all(count(b) == 18_889_856 for b in model.blocks)


def test_frame_block_causal_mask_structure():
    n = 3
    mask = frame_block_causal_mask(4, 4, n)
    assert mask.dtype == torch.bool and mask.shape == (12, 12)
    for q in range(12):
        for k in range(12):
            assert mask[q, k] == (k // n <= q // n)
    # a single new frame after 3 cached ones sees everything
    assert frame_block_causal_mask(1, 4, n).all()


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", ["model.encoder_layers=2", "model.decoder_layers=1", "model.layers=3"])
    return cfg


def randomize(model: torch.nn.Module) -> None:
    """Give zero-initialised layers random weights so every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_decoder_outputs_zero_and_encoder_outputs_layernorm_at_init(tiny):
    model = build_model(tiny.model).eval()
    m = tiny.model
    latents = torch.randn(2, 3, m.latent_channels, m.latent_height, m.latent_width)
    context = model.encoder(latents, torch.zeros(2, 3, dtype=torch.long))
    assert torch.allclose(context.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(context.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
    out = model.decoder(latents[:, 0], torch.tensor([500.0, 10.0]), context[:, 0], torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


def scd_prediction(model, latents, encoder_actions, noisy, t):
    """Decoder prediction for frame t from the training forward.

    The encoder reads frame i with the action leading into frame i+1, so the decoder's own action
    for frame t is encoder_actions[:, t - 1].
    """
    return model(latents, encoder_actions, noisy, torch.tensor([400.0]), encoder_actions[:, t - 1],
                 torch.tensor([t - 1]))


def test_changing_frames_at_or_after_t_never_changes_frame_t_prediction(tiny):
    model = build_model(tiny.model).eval()
    randomize(model)
    m = tiny.model
    frames, t = 6, 3
    latents = torch.randn(1, frames, m.latent_channels, m.latent_height, m.latent_width)
    actions = torch.randint(0, 4, (1, frames))
    noisy = torch.randn(1, m.latent_channels, m.latent_height, m.latent_width)
    enc_actions = torch.roll(actions, -1, 1)
    base = scd_prediction(model, latents, enc_actions, noisy, t)
    later = latents.clone()
    later[:, t:] = torch.randn_like(later[:, t:])
    later_actions = enc_actions.clone()
    later_actions[:, t:] = (later_actions[:, t:] + 1) % 4
    assert torch.allclose(base, scd_prediction(model, later, later_actions, noisy, t), atol=1e-6)
    earlier = latents.clone()
    earlier[:, t - 1] += 1.0
    assert not torch.allclose(base, scd_prediction(model, earlier, enc_actions, noisy, t), atol=1e-3)


def test_encoder_kv_cache_matches_full_causal_forward(tiny):
    model = build_model(tiny.model).eval()
    randomize(model)
    m = tiny.model
    latents = torch.randn(2, 5, m.latent_channels, m.latent_height, m.latent_width)
    actions = torch.randint(0, 4, (2, 5))
    full = model.encoder(latents, actions)
    cache = model.encoder.new_kv_cache(2, 5, torch.float32, "cpu")
    parts = [model.encoder(latents[:, :2], actions[:, :2], cache, 0)]
    for f in range(2, 5):
        parts.append(model.encoder(latents[:, f:f + 1], actions[:, f:f + 1], cache, f))
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)


def test_dense_kv_cache_matches_full_causal_forward(tiny):
    cfg = tiny.model
    cfg.arch = "causal_dit"
    model = build_model(cfg).eval()
    randomize(model)
    latents = torch.randn(1, 4, cfg.latent_channels, cfg.latent_height, cfg.latent_width)
    t = torch.tensor([[-1.0, -1.0, -1.0, 300.0]])
    actions = torch.randint(0, 4, (1, 4))
    full = model(latents, t, actions)
    cache = model.new_kv_cache(1, 5, torch.float32, "cpu")
    model(latents[:, :3], t[:, :3], actions[:, :3], cache, 0, commit=True)
    step = model(latents[:, 3:], t[:, 3:], actions[:, 3:], cache, 3, commit=False)
    assert torch.allclose(full[:, 3:], step, atol=1e-5)
    # a denoising pass does not consume cache space: repeating it gives the same answer
    again = model(latents[:, 3:], t[:, 3:], actions[:, 3:], cache, 3, commit=False)
    assert torch.equal(step, again)


def test_model_rejects_more_frames_than_configured(tiny):
    tiny.model.max_frames = 4
    model = build_model(tiny.model)
    m = tiny.model
    with pytest.raises(ValueError, match="max_frames=4"):
        model.encoder(torch.randn(1, 5, m.latent_channels, m.latent_height, m.latent_width))
