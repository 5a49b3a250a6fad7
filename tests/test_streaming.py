"""Endless streaming: the windowed mask, its position rule, the ring-buffer KV cache, constant
memory past max_frames, exact equality with full attention for a window at least the clip, and the
refusals a full-history stream gives."""

import math

import pytest
import torch

from scd_train.config import ConfigError, load_config
from scd_train.diffusion.sampling import (
    SamplerSettings,
    StreamLengthError,
    generate,
    new_stream,
)
from scd_train.models import attention as attention_module
from scd_train.models import build_model
from scd_train.models.attention import (
    AttentionWindow,
    RingKVCache,
    SinkCopies,
    attend,
    frame_block_causal_mask,
    window_mask_mod,
)
from scd_train.models.rope import RotaryTables, apply_rotary

TINY = ["model.encoder_layers=2", "model.decoder_layers=1", "model.layers=2", "model.attention=sdpa"]


def tiny_cfg(*overrides):
    return load_config("configs/tiny.yaml", [*TINY, *overrides])


def randomized(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def latents(cfg, batch, frames, seed=1):
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, m.latent_channels, m.latent_height, m.latent_width, generator=g)


# -- the mask ---------------------------------------------------------------------------------
@pytest.mark.parametrize("window,sinks", [(3, 0), (3, 1), (2, 2)])
def test_window_mask_follows_the_rule_and_flex_mask_mod_agrees(window, sinks):
    n, frames = 2, 9
    w = AttentionWindow(window, sinks)
    mask = frame_block_causal_mask(frames, frames, n, window=w)
    copies = w.sink_copies(frames)
    assert mask.shape == (frames * n, (frames + copies * sinks) * n)
    pinned_start = sinks + window - 1  # P: queries after it see pinned copies of the sinks
    for q in range(frames * n):
        f = q // n
        for k in range(frames * n):
            g = k // n
            expected = g <= f and (f - g < window or (g < sinks and f <= pinned_start))
            assert bool(mask[q, k]) == expected, (f, g)
        for j in range(copies * sinks * n):
            assert bool(mask[q, frames * n + j]) == (f == pinned_start + 1 + j // (sinks * n))
    q_idx = torch.arange(mask.shape[0])[:, None]
    kv_idx = torch.arange(mask.shape[1])[None, :]
    assert torch.equal(window_mask_mod(frames, frames, n, w)(0, 0, q_idx, kv_idx), mask)
    # a window at least as long as the clip is the plain frame-causal mask
    assert torch.equal(frame_block_causal_mask(frames, frames, n, window=AttentionWindow(frames, sinks)),
                       frame_block_causal_mask(frames, frames, n))


def naive_windowed_attention(q, k, v, frames, n, window: AttentionWindow, rotary: RotaryTables):
    """The position rule written out: each query frame f, at id min(f, P), sees its window at the
    true distances and (f > P) the sinks at ids 0..S-1; ids never exceed P = S + W - 1."""
    s, w = window.sinks, window.frames
    pinned = s + w - 1
    out = torch.empty_like(q)
    for f in range(frames):
        q_id = min(f, pinned)
        visible = [g for g in range(frames) if g <= f and (f - g < w or g < s)]
        ids = [q_id - (f - g) if f - g < w else g for g in visible]
        assert max(ids + [q_id]) <= pinned
        rows = slice(f * n, (f + 1) * n)
        qf = apply_rotary(q[:, :, rows], rotary.frames(q_id, 1, q.device))
        keys = torch.cat([apply_rotary(k[:, :, g * n:(g + 1) * n], rotary.frames(i, 1, q.device))
                          for g, i in zip(visible, ids)], dim=2)
        values = torch.cat([v[:, :, g * n:(g + 1) * n] for g in visible], dim=2)
        logits = (qf.double() @ keys.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out[:, :, rows] = (logits.softmax(-1) @ values.double()).to(q.dtype)
    return out


@pytest.mark.parametrize("window,sinks", [(3, 0), (3, 1), (2, 2), (1, 1)])
def test_training_mask_and_ring_cache_both_follow_the_position_rule(window, sinks):
    """Same q, k, v three ways: the rule written out with bounded ids, the training path (absolute
    ids, mask, pinned sink copies, one SDPA call) and the ring cache frame by frame."""
    torch.manual_seed(0)
    n, frames, heads, dh = 4, 10, 2, 32
    w = AttentionWindow(window, sinks)
    rotary = RotaryTables([8, 12, 12], 10000.0, 2, 2)
    q, k, v = (torch.randn(1, heads, frames * n, dh) for _ in range(3))
    expected = naive_windowed_attention(q, k, v, frames, n, w, rotary)

    table = rotary.frames(0, frames, q.device)
    q_rot, k_rot = apply_rotary(q, table), apply_rotary(k, table)
    copies = SinkCopies.build(w, frames, rotary, q.device)
    k_all, v_all = copies.extend(k_rot, v) if copies else (k_rot, v)
    trained = attend(q_rot, k_all, v_all, frame_block_causal_mask(frames, frames, n, window=w))
    assert torch.allclose(trained, expected, atol=1e-5)

    cache = RingKVCache(1, 1, heads, dh, w, rotary, torch.float32)
    streamed = []
    for f in range(frames):
        ids = rotary.frames(cache.frame_id(f), 1, q.device)
        rows = slice(f * n, (f + 1) * n)
        streamed.append(cache.attend(0, apply_rotary(q[:, :, rows], ids), apply_rotary(k[:, :, rows], ids),
                                     v[:, :, rows], None))
        cache.advance(n)
        assert cache.frame_id(f) < w.span
    assert torch.allclose(torch.cat(streamed, dim=2), expected, atol=1e-5)


# -- the models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("window,sinks", [(3, 0), (3, 1), (2, 2)])
def test_encoder_ring_cache_matches_uncached_windowed_forward_at_constant_memory(window, sinks):
    cfg = tiny_cfg(f"model.encoder_window={window}", f"model.encoder_sink_frames={sinks}")
    model = randomized(cfg)
    frames = 12
    x, actions = latents(cfg, 2, frames), torch.randint(0, 4, (2, frames))
    with torch.no_grad():
        full = model.encoder(x, actions)
        cache = model.encoder.new_kv_cache(2, None, torch.float32, "cpu")
        assert isinstance(cache, RingKVCache)
        parts = [model.encoder(x[:, :4], actions[:, :4], cache, 0)]  # a prefix, then frame by frame
        storage = (cache.keys.data_ptr(), cache.values.data_ptr(), cache.nbytes)
        for f in range(4, frames):
            parts.append(model.encoder(x[:, f:f + 1], actions[:, f:f + 1], cache, f))
            # overwritten in place: the same storage from the first write on, whatever the length
            assert (cache.keys.data_ptr(), cache.values.data_ptr(), cache.nbytes) == storage
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)
    assert cache.nbytes == 2 * 2 * 2 * cfg.model.num_heads * (window + sinks) * 16 * cfg.model.head_dim * 4


@pytest.mark.parametrize("window,sinks", [(3, 1), (2, 0)])
def test_dense_ring_cache_matches_uncached_windowed_forward(window, sinks):
    cfg = tiny_cfg("model.arch=causal_dit", f"model.encoder_window={window}", f"model.encoder_sink_frames={sinks}")
    model = randomized(cfg)
    frames = 9
    x, actions = latents(cfg, 1, frames), torch.randint(0, 4, (1, frames))
    t = torch.full((1, frames), -1.0)
    t[:, -1] = 300.0  # the last frame is being denoised, all earlier ones are clean context
    with torch.no_grad():
        full = model(x, t, actions)
        cache = model.new_kv_cache(1, None, torch.float32, "cpu")
        model(x[:, :2], t[:, :2], actions[:, :2], cache, 0, commit=True)
        for f in range(2, frames - 1):
            model(x[:, f:f + 1], t[:, f:f + 1], actions[:, f:f + 1], cache, f, commit=True)
        step = model(x[:, -1:], t[:, -1:], actions[:, -1:], cache, frames - 1, commit=False)
        again = model(x[:, -1:], t[:, -1:], actions[:, -1:], cache, frames - 1, commit=False)
    assert torch.allclose(full[:, -1:], step, atol=1e-5)
    assert torch.equal(step, again)  # a denoising pass leaves the committed window alone


@pytest.mark.parametrize("arch", ["scd", "causal_dit"])
def test_window_at_least_the_clip_equals_full_attention_exactly(arch):
    frames = 8
    full_cfg = tiny_cfg(f"model.arch={arch}")
    windowed_cfg = tiny_cfg(f"model.arch={arch}", f"model.encoder_window={frames}")
    full, windowed = randomized(full_cfg), randomized(windowed_cfg)
    x, actions = latents(full_cfg, 2, frames), torch.randint(0, 4, (2, frames))
    with torch.no_grad():
        if arch == "scd":
            assert torch.equal(full.encoder(x, actions), windowed.encoder(x, actions))
        else:
            t = torch.rand(2, frames) * 1000
            assert torch.equal(full(x, t, actions), windowed(x, t, actions))
    # streams too: until S + W frames the ring cache is the full-history cache, op for op
    settings = SamplerSettings(steps=2)
    a = generate(full, x[:, :2], actions, frames - 2, settings, torch.Generator().manual_seed(3))
    b = generate(windowed, x[:, :2], actions, frames - 2, settings, torch.Generator().manual_seed(3))
    assert torch.equal(a.frames, b.frames)


@pytest.mark.parametrize("arch", ["scd", "causal_dit"])
def test_windowed_stream_runs_past_max_frames_at_constant_memory(arch):
    cfg = tiny_cfg(f"model.arch={arch}", "model.max_frames=8", "data.clip_frames=8", "model.encoder_window=3",
                   "model.encoder_sink_frames=1")
    model = randomized(cfg)
    stream = new_stream(model, SamplerSettings(steps=1), 1, None, torch.Generator().manual_seed(0))
    stream.prefill(latents(cfg, 1, 2), torch.tensor([[0, 1]]))
    sizes = []
    for i in range(20):  # 22 frames against max_frames=8
        frame = stream.next_frame(torch.tensor([i % 4]))
        assert torch.isfinite(frame).all()
        sizes.append((stream.cache.keys.data_ptr(), stream.cache.nbytes))
        assert stream.last_timing.encoder >= 0 and stream.last_timing.decoder > 0
    assert len(set(sizes[3:])) == 1  # constant from the first full window on


@pytest.mark.parametrize("arch", ["scd", "causal_dit"])
def test_full_history_refuses_past_max_frames_naming_both_numbers(arch):
    cfg = tiny_cfg(f"model.arch={arch}", "model.max_frames=8", "data.clip_frames=8")
    model = randomized(cfg)
    x = latents(cfg, 1, 4)
    with pytest.raises(StreamLengthError, match=r"rollout of 9 frames \(4 context \+ 5 generated\) exceeds "
                                                r"model.max_frames=8.*encoder_window"):
        generate(model, x, None, 5, SamplerSettings(steps=1))
    assert generate(model, x, None, 4, SamplerSettings(steps=1)).frames.shape[1] == 8  # the limit itself runs
    stream = new_stream(model, SamplerSettings(steps=1), 1)
    stream.prefill(x)
    with pytest.raises(StreamLengthError, match="max_frames=8"):
        for _ in range(10):
            stream.next_frame()


def test_steps_may_change_between_frames():
    cfg = tiny_cfg()
    model = randomized(cfg)
    settings = SamplerSettings(steps=3)
    stream = new_stream(model, settings, 1, None, torch.Generator().manual_seed(0))
    stream.prefill(latents(cfg, 1, 2))
    stream.next_frame()
    settings.steps = 5  # e.g. a play page moving a slider
    stream.next_frame()
    settings.steps = 2
    stream.next_frame()
    assert stream.counts.denoise == 3 + 5 + 2 and stream.counts.context == 3


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["model.encoder_window=65"], r"model.encoder_window=65 is larger than model.max_frames=64"),
    (["model.encoder_window=4", "model.encoder_sink_frames=5"],
     r"model.encoder_sink_frames=5 is larger than model.encoder_window=4"),
    (["model.encoder_sink_frames=2"], r"model.encoder_sink_frames=2 needs model.encoder_window"),
    (["model.encoder_window=60", "model.encoder_sink_frames=8"], r"60 \+ model.encoder_sink_frames=8 = 68 exceeds"),
    (["model.encoder_window=0"], r"model.encoder_window=0 must be >= 1"),
])
def test_bad_window_settings_name_the_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(*overrides)


def test_backend_without_flex_cannot_express_a_window(monkeypatch):
    monkeypatch.setattr(attention_module, "create_block_mask", None)
    with pytest.raises(ConfigError, match=r"model.attention='flex' cannot express model.encoder_window=4"):
        load_config("configs/tiny.yaml", ["model.attention=flex", "model.encoder_window=4"])
    load_config("configs/tiny.yaml", ["model.attention=sdpa", "model.encoder_window=4"])


def test_attention_probes_refuse_a_wrapped_ring_cache():
    from scd_train.eval.probes import probe_dense_model

    cfg = tiny_cfg("model.arch=causal_dit", "model.encoder_window=3", "model.encoder_sink_frames=1")
    model = randomized(cfg)
    result = probe_dense_model(model, latents(cfg, 1, 3), None, steps=2)  # 3 + 1 frames fit S + W = 4
    assert result.frame_mass.shape[-1] == 4
    with pytest.raises(TypeError, match=r"model.encoder_window=3, model.encoder_sink_frames=1\) has wrapped"):
        probe_dense_model(model, latents(cfg, 1, 4), None, steps=2)


def test_flops_per_frame_stay_flat_with_a_window():
    from scd_train.metrics.flops import generated_frame_flops

    windowed = tiny_cfg("model.encoder_window=4", "model.encoder_sink_frames=1").model
    full = tiny_cfg().model
    assert generated_frame_flops(windowed, 10, 4, False).total == generated_frame_flops(windowed, 60, 4, False).total
    assert generated_frame_flops(full, 10, 4, False).total < generated_frame_flops(full, 60, 4, False).total
    # before the window fills, windowed and full history cost the same
    assert generated_frame_flops(windowed, 3, 4, False).total == generated_frame_flops(full, 3, 4, False).total
