"""The decoder loop and the per-step cheap wins: compiled == eager within tolerance, the function a
CUDA graph captures == the plain loop, precomputed conditioning and RoPE tables == the per-step
computation, the KV cache in the compute dtype, and compilation leaving training untouched."""

import pytest
import torch

from scd_train.config import load_config
from scd_train.diffusion.decoder_loop import DecoderLoop, EulerStep, _Capture, resolve_loop, run_steps
from scd_train.diffusion.objective import build_objective
from scd_train.diffusion.sampling import SamplerSettings, euler_sigmas, guided_velocity, new_stream
from scd_train.models import build_model
from scd_train.models import rope as rope_module

SMALL = ["model.width=64", "model.num_heads=2", "model.head_dim=32", "model.encoder_layers=1",
         "model.decoder_layers=1", "model.layers=2", "model.attention=sdpa"]

COMPILE_TOLERANCE = 1e-4
"""Compiled and eager frames agree to this absolute error (unit-variance latents, fp32): inductor
fuses and reorders the same fp32 arithmetic, which moves results by round-off only."""


def small_model(*overrides):
    cfg = load_config("configs/tiny.yaml", [*SMALL, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, cfg


def context_frames(cfg, frames=2, seed=1):
    m = cfg.model
    return torch.randn(1, frames, m.latent_channels, m.latent_height, m.latent_width,
                       generator=torch.Generator().manual_seed(seed))


def roll(model, cfg, settings, frames=3):
    stream = new_stream(model, settings, 1, None, torch.Generator().manual_seed(5))
    stream.warm_up()
    stream.prefill(context_frames(cfg), torch.tensor([[0, 1]]))
    return torch.stack([stream.next_frame(torch.tensor([i % 4])) for i in range(frames)], 1), stream


@pytest.mark.slow
def test_compiled_decoder_loop_matches_eager_and_leaves_training_untouched():
    model, cfg = small_model()
    keys_before = list(model.state_dict())
    eager, _ = roll(model, cfg, SamplerSettings(steps=3, compile="off"))
    compiled, stream = roll(model, cfg, SamplerSettings(steps=3, compile="on"))
    assert stream._loop.mode == "compile" and stream._loop._compiled is not None
    assert (compiled - eager).abs().max() < COMPILE_TOLERANCE
    assert not torch.equal(compiled, torch.zeros_like(compiled))
    # the model is wrapped, never replaced: same state-dict keys, and it still trains
    assert list(model.state_dict()) == keys_before
    model.train()
    x = torch.randn(2, 4, cfg.model.latent_channels, cfg.model.latent_height, cfg.model.latent_width)
    out = build_objective(cfg.model, cfg.diffusion)(model, x, torch.randint(0, 4, (2, 4)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.decoder.blocks[0].qkv.weight.grad is not None


def reference_frame(decoder, x, context, context_uncond, action, settings):
    """The decoder loop as plain per-step calls: timestep and action embedded at every step."""
    sigmas = euler_sigmas(settings.steps, settings.num_train_timesteps)
    for i in range(settings.steps):
        t = sigmas[i].expand(x.shape[0]) * settings.num_train_timesteps
        if context_uncond is None:
            v = decoder(x, t, context, action)
        else:
            v_cond = decoder(x, t, context, action)
            v_uncond = decoder(x, t, context_uncond, action)
            v = guided_velocity(v_cond, v_uncond, settings.cfg_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
    return x


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_captured_function_and_precomputed_conditioning_match_per_step_calls(cfg_scale):
    """``run_steps`` (what a CUDA graph captures, and the eager loop) with conditioning computed
    for all steps at once equals step-by-step decoder calls, to round-off."""
    model, cfg = small_model()
    settings = SamplerSettings(steps=4, cfg_scale=cfg_scale)
    m = cfg.model
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, m.latent_channels, m.latent_height, m.latent_width, generator=g)
    context, context_uncond = (torch.randn(2, 16, m.width, generator=g) for _ in range(2))
    action = torch.tensor([1, 3])
    guided = cfg_scale != 1.0
    with torch.no_grad():
        expected = reference_frame(model.decoder, x, context, context_uncond if guided else None, action, settings)
        sigmas = euler_sigmas(settings.steps)
        timesteps = (sigmas[:-1] * 1000)[:, None].expand(-1, 4 if guided else 2)
        conditioning = model.decoder.step_conditioning(timesteps, torch.cat([action, action]) if guided else action)
        both = torch.cat([context, context_uncond]) if guided else context
        got = run_steps(EulerStep(model.decoder), x, sigmas[1:] - sigmas[:-1], both, conditioning.steps(),
                        cfg_scale if guided else None)
    assert torch.allclose(got, expected, atol=1e-5)


class _ReplayingGraph:
    """Stands in for torch.cuda.CUDAGraph on a CPU: replay reruns the captured function on the
    static buffers, so the buffer plumbing of ``_Capture`` is checked without a GPU."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def test_graph_replay_feeds_every_input_through_its_static_buffers():
    model, cfg = small_model()
    m, steps = cfg.model, 3
    step = EulerStep(model.decoder)
    sigmas = euler_sigmas(steps)
    dts = sigmas[1:] - sigmas[:-1]

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, m.latent_channels, m.latent_height, m.latent_width, generator=g)
        context = torch.randn(1, 16, m.width, generator=g)
        t = (sigmas[:-1] * 1000)[:, None]
        return x, context, model.decoder.step_conditioning(t, torch.tensor([seed % 4]))

    with torch.no_grad():
        x0, c0, cond0 = inputs(0)
        static = type(cond0)(cond0.cond_act.clone(), [tuple(t.clone() for t in b) for b in cond0.blocks],
                             tuple(t.clone() for t in cond0.output))
        capture = _Capture(None, x0.clone(), dts.clone(), c0.clone(), static, torch.empty_like(x0))
        capture.graph = _ReplayingGraph(lambda: capture.out.copy_(
            run_steps(step, capture.x, capture.dts, capture.context, capture.conditioning.steps(), None)))
        for seed in (1, 2):  # new noise, context and action each frame
            x, context, cond = inputs(seed)
            direct = run_steps(step, x, dts, context, cond.steps(), None)
            assert torch.equal(capture.replay(x, dts, context, cond), direct)


def test_loop_modes_and_the_off_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_loop("off", cpu) == resolve_loop("off", cuda) == "eager"
    assert resolve_loop("auto", cpu) == "eager" and resolve_loop("on", cpu) == "compile"
    assert resolve_loop("auto", cuda) == ("graph" if torch.cuda.is_available() else "compile")
    with pytest.raises(ValueError, match="expected one of auto, on, off"):
        resolve_loop("fast", cpu)
    model, _ = small_model()
    assert DecoderLoop(model.decoder, "auto", cpu).mode == "eager"


def test_rope_tables_are_computed_once_per_rollout(monkeypatch):
    model, cfg = small_model()
    calls = []
    original = rope_module.rope_angles
    monkeypatch.setattr(rope_module, "rope_angles", lambda *a, **k: calls.append(1) or original(*a, **k))
    stream = new_stream(model, SamplerSettings(steps=4), 1, None, torch.Generator().manual_seed(0))
    stream.prefill(context_frames(cfg))
    stream.next_frame()
    stream.next_frame()
    warm = len(calls)
    for _ in range(5):
        stream.next_frame()
    assert warm > 0 and len(calls) == warm  # none in 5 more frames of 4 steps


@pytest.mark.parametrize("arch", ["scd", "causal_dit"])
def test_kv_cache_is_stored_in_the_compute_dtype(arch):
    """Under bf16 autocast the cache holds bf16, so no attention call re-casts it, and the frames
    are exactly those of an fp32 cache that is re-cast at every call."""
    model, cfg = small_model(f"model.arch={arch}")
    frames = {}
    for dtype in (None, torch.float32):
        stream = new_stream(model, SamplerSettings(steps=2), 1, None, torch.Generator().manual_seed(0))
        cache_owner = stream.model.encoder if arch == "scd" else stream.model
        stream.cache = cache_owner.new_kv_cache(1, 63, dtype, "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stream.prefill(context_frames(cfg))
            frames[dtype] = torch.stack([stream.next_frame() for _ in range(3)])
        assert stream.cache.keys.dtype == (torch.bfloat16 if dtype is None else torch.float32)
    assert torch.equal(frames[None], frames[torch.float32])



def test_a_pinned_cpu_kernel_instruction_set_runs_the_loop_eagerly_and_says_so(monkeypatch):
    from scd_train.errors import ScdWarning

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    with pytest.warns(ScdWarning, match="ATEN_CPU_CAPABILITY=avx2 is set: the decoder loop runs eagerly"):
        assert resolve_loop("on", torch.device("cpu")) == "eager"
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert resolve_loop("on", torch.device("cpu")) == "compile" and resolve_loop("auto", torch.device("cpu")) == "eager"
