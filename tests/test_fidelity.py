"""Recipe fidelity to the release: history kind, q/k/v initialisation, the projected token fusion."""

from __future__ import annotations

import math

import pytest
import torch

from scd_train.config import load_config
from scd_train.diffusion.objective import build_objective
from scd_train.metrics.flops import decoder_forward, train_step_flops
from scd_train.models import build_model, transformer_blocks
from scd_train.models.attention import teacher_forcing_mask, teacher_forcing_mask_mod

TINY = ["model.encoder_layers=2", "model.decoder_layers=1", "model.layers=3"]


def tiny(*overrides: str):
    return load_config("configs/tiny.yaml", [*TINY, *overrides])


def randomize(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Give zero-initialised layers random weights so every path carries signal."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith(skip):
                p.add_(torch.randn_like(p) * 0.05)


def frames(cfg, batch: int, count: int) -> torch.Tensor:
    m = cfg.model
    return torch.randn(batch, count, m.latent_channels, m.latent_height, m.latent_width)


# -- 1. history --------------------------------------------------------------------------------------


def test_scd_m_and_its_baseline_train_on_the_releases_noisy_history():
    scd, dense = load_config("configs/scd_m.yaml"), load_config("configs/causal_dit_m.yaml")
    assert scd.model.encoder_input == dense.model.encoder_input == "noisy"
    assert load_config("configs/tiny.yaml").model.encoder_input == "noisy"  # the dataclass default


@pytest.mark.parametrize("history", ["noisy", "clean"])
def test_scd_encoder_reads_noised_or_clean_frames(history):
    cfg = tiny(f"model.encoder_input={history}")
    model = build_model(cfg.model)
    seen = []
    model.encoder.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    latents = frames(cfg, 2, 4)
    torch.manual_seed(0)
    build_objective(cfg.model, cfg.diffusion)(model, latents, torch.randint(0, 4, (2, 4)))
    encoder_in = seen[0]
    assert torch.equal(encoder_in[:, 0], latents[:, 0])  # frame 0 is always clean
    assert torch.equal(encoder_in, latents) == (history == "clean")


def test_teacher_forcing_mask_lets_noisy_frame_t_see_only_clean_frames_before_it_and_itself():
    f, n = 4, 2
    mask = teacher_forcing_mask(f, n)
    assert mask.shape == (2 * f * n, 2 * f * n)
    for q in range(2 * f * n):
        for k in range(2 * f * n):
            qf, kf = q // n, k // n
            # clean copy: the usual frame-causal rule; noisy frame t = qf - f: clean frames < t, itself
            want = kf <= qf if qf < f else (kf < qf - f or kf == qf)
            assert bool(mask[q, k]) == want, (q, k)


def test_flex_mask_mod_states_the_same_rule():
    from torch.nn.attention.flex_attention import create_mask

    flex = create_mask(teacher_forcing_mask_mod(3, 2), None, None, 12, 12, device="cpu")[0, 0]
    assert torch.equal(flex, teacher_forcing_mask(3, 2))


@pytest.fixture
def dense_clean():
    torch.manual_seed(0)
    cfg = tiny("model.arch=causal_dit", "model.encoder_input=clean")
    model = build_model(cfg.model).eval()
    randomize(model)
    return cfg, model


def test_teacher_forced_training_pass_equals_the_streaming_pass_it_trains_for(dense_clean):
    """Noisy frame t in a teacher-forced clip gets the velocity the sampler computes for it after
    committing the clean frames 0..t-1 to the KV cache."""
    cfg, model = dense_clean
    clean, noisy = frames(cfg, 2, 5), frames(cfg, 2, 5)
    t = torch.full((2, 5), 700.0)
    actions = torch.randint(0, 4, (2, 5))
    trained = model(noisy, t, actions, clean_history=clean)
    for frame in (1, 3):
        cache = model.new_kv_cache(2, 5, torch.float32, "cpu")
        model(clean[:, :frame], torch.full((2, frame), -1.0), actions[:, :frame], cache, 0, commit=True)
        streamed = model(noisy[:, frame:frame + 1], t[:, frame:frame + 1], actions[:, frame:frame + 1], cache,
                         frame, commit=False)
        assert torch.allclose(trained[:, frame], streamed[:, 0], atol=1e-5)


def test_teacher_forced_frame_t_depends_on_clean_frames_before_t_only(dense_clean):
    cfg, model = dense_clean
    clean, noisy = frames(cfg, 1, 5), frames(cfg, 1, 5)
    t, frame = torch.full((1, 5), 500.0), 2
    base = model(noisy, t, None, clean_history=clean)[:, frame]
    later_clean = clean.clone()
    later_clean[:, frame:] += 1.0  # its own clean copy and everything after it
    other_noisy = noisy.clone()
    other_noisy[:, [0, 1, 3, 4]] += 1.0
    assert torch.allclose(base, model(noisy, t, None, clean_history=later_clean)[:, frame], atol=1e-6)
    assert torch.allclose(base, model(other_noisy, t, None, clean_history=clean)[:, frame], atol=1e-6)
    earlier_clean = clean.clone()
    earlier_clean[:, frame - 1] += 1.0
    assert not torch.allclose(base, model(noisy, t, None, clean_history=earlier_clean)[:, frame], atol=1e-3)


def test_dense_objective_with_clean_history_trains_and_counts_twice_the_tokens():
    cfg = tiny("model.arch=causal_dit", "model.encoder_input=clean")
    model = build_model(cfg.model)
    randomize(model)
    calls = []
    model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    latents = frames(cfg, 2, 4)
    out = build_objective(cfg.model, cfg.diffusion)(model, latents, torch.randint(0, 4, (2, 4)))
    out.loss.backward()
    k = cfg.diffusion.decoder_multi_batch
    assert torch.equal(calls[0]["clean_history"], latents.repeat(k, 1, 1, 1, 1))
    assert math.isfinite(float(out.loss.detach())) and model.blocks[0].qkv.weight.grad.abs().sum() > 0
    noisy_cfg = tiny("model.arch=causal_dit", "model.encoder_input=noisy")
    ratio = train_step_flops(cfg).total / train_step_flops(noisy_cfg).total
    assert 1.9 < ratio < 2.05  # twice the tokens and attention pairs; the output head runs once


# -- 2. q, k, v initialisation ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["scd", "causal_dit"])
def test_q_k_and_v_each_get_the_xavier_std_of_a_square_layer(arch):
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", [f"model.arch={arch}", "model.width=256", "model.num_heads=4",
                                            "model.head_dim=64", "model.rope_axes=[16,24,24]"])
    model = build_model(cfg.model)
    d = cfg.model.width
    want = math.sqrt(2.0 / (d + d))  # Xavier-uniform std of one D x D layer
    fused = math.sqrt(2.0 / (d + 3 * d))  # what Xavier over the fused 3D x D matrix would give
    blocks = transformer_blocks(model)
    assert len(blocks) == (6 if arch == "scd" else cfg.model.layers)
    for name, block in blocks:
        for part, weight in zip("qkv", block.qkv.weight.detach().chunk(3), strict=True):
            std = float(weight.std())
            assert abs(std - want) / want < 0.02, (name, part, std, want)
            assert float(weight.abs().max()) <= math.sqrt(3.0) * want + 1e-6
        assert abs(float(block.qkv.weight.std()) - fused) / fused > 0.3
        assert torch.count_nonzero(block.qkv.bias) == 0


# -- 3. token_concat_with_proj ----------------------------------------------------------------------


def test_projected_token_concat_adds_a_layernorm_and_a_linear_to_the_decoder():
    plain = build_model(tiny().model)
    projected = build_model(tiny("model.fusion=token_concat_with_proj").model)
    d = tiny().model.width
    count = lambda m: sum(p.numel() for p in m.decoder.parameters())  # noqa: E731
    assert count(projected) - count(plain) == d * d + d + 2 * d
    align = projected.decoder.context_align
    assert torch.count_nonzero(align[1].weight) == 0 and torch.count_nonzero(align[1].bias) == 0
    assert torch.equal(align[0].weight, torch.ones(d)) and torch.equal(align[0].bias, torch.zeros(d))
    m = tiny("model.fusion=token_concat_with_proj").model
    n = (m.latent_height // m.patch_size) * (m.latent_width // m.patch_size)
    assert decoder_forward(m, 1) - decoder_forward(tiny().model, 1) == 2 * n * d * d


def test_projected_fusion_starts_blind_to_the_context_and_learns_to_open_it():
    torch.manual_seed(0)
    cfg = tiny("model.fusion=token_concat_with_proj")
    model = build_model(cfg.model)
    randomize(model, skip=("decoder.context_align.1",))
    m, n = cfg.model, model.decoder.tokens_per_frame
    noisy, t, act = frames(cfg, 2, 1)[:, 0], torch.tensor([300.0, 800.0]), torch.tensor([1, 2])
    ctx_a, ctx_b = torch.randn(2, n, m.width), torch.randn(2, n, m.width)
    model.eval()
    assert torch.equal(model.decoder(noisy, t, ctx_a, act), model.decoder(noisy, t, ctx_b, act))
    # a training step: gradient reaches the zero Linear, but not yet the encoder behind it
    model.train()
    build_objective(cfg.model, cfg.diffusion)(model, frames(cfg, 2, 4), torch.randint(0, 4, (2, 4))).loss.backward()
    assert model.decoder.context_align[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.encoder.parameters())
    randomize(model.decoder.context_align)
    model.eval()
    assert not torch.allclose(model.decoder(noisy, t, ctx_a, act), model.decoder(noisy, t, ctx_b, act))


def test_a_windowed_dense_baseline_refuses_teacher_forcing_and_trains_on_noisy_history():
    from scd_train.config import ConfigError

    with pytest.raises(ConfigError, match="teacher forcing .* has no windowed mask; use model.encoder_input=noisy"):
        tiny("model.arch=causal_dit", "model.encoder_input=clean", "model.encoder_window=2")
    cfg = tiny("model.arch=causal_dit", "model.encoder_window=2")
    model = build_model(cfg.model)
    objective = build_objective(cfg.model, cfg.diffusion)
    out = objective(model, frames(cfg, 2, 4), torch.randint(0, 4, (2, 4)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.window.bounded
