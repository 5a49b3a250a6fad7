"""Checks run before the first FP8 step: hardware, GEMM alignment, repeated module calls.

GEMM shapes come from tracing one training micro-batch of the real objective on the meta device
(no memory, no compute), so the token counts are exactly what training will feed each layer,
including the decoder's batched (target frame x noise draw) samples and every clip length a
random-length schedule can draw.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from scd_train.config import Config, Fp8Config
from scd_train.diffusion.objective import build_objective
from scd_train.models import build_model
from scd_train.precision.selection import Fp8Error

FP8_MIN_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0
MXFP8_MIN_CAPABILITY = (10, 0)  # Blackwell


def alignment(recipe: str) -> int:
    """Every dimension of an FP8 GEMM (tokens and features) must be a multiple of this."""
    return 32 if recipe == "mxfp8" else 16


def check_hardware(cfg: Fp8Config, device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """Refuse FP8 where it cannot run; never fall back to bf16 silently.

    ``capability`` is the CUDA compute capability (looked up when None and the device is CUDA).
    """
    if device.type == "cpu":
        if cfg.backend == "te":
            raise Fp8Error("precision.fp8.backend='te' needs a CUDA GPU: Transformer Engine has no CPU build. "
                           "Run on a GPU with compute capability >= 8.9, or for CPU numerics checks use "
                           "precision.fp8.backend=torchao precision.fp8.cpu_emulation=true")
        if not cfg.cpu_emulation:
            raise Fp8Error("precision.fp8 is enabled but the device is CPU, which has no FP8 matmul units. "
                           "Set precision.fp8.cpu_emulation=true to run torchao's float8 emulation (numerics "
                           "only, slower than fp32), or disable precision.fp8.enabled")
        return
    if device.type != "cuda":
        raise Fp8Error(f"precision.fp8 needs a CUDA device or CPU emulation; got device {device}")
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    need = MXFP8_MIN_CAPABILITY if cfg.recipe == "mxfp8" else FP8_MIN_CAPABILITY
    if tuple(capability) < need:
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "this GPU"
        what = "MXFP8 (precision.fp8.recipe=mxfp8)" if cfg.recipe == "mxfp8" else "FP8"
        hint = ("use precision.fp8.recipe=current or delayed" if cfg.recipe == "mxfp8" and
                tuple(capability) >= FP8_MIN_CAPABILITY else "disable precision.fp8.enabled (bf16 training)")
        raise Fp8Error(f"{what} needs compute capability >= {need[0]}.{need[1]}, but {name} has "
                       f"{capability[0]}.{capability[1]}; {hint}")


@dataclass
class GemmTrace:
    """Per linear layer: how many times one micro-batch calls it, and its input shapes."""

    calls: Counter = field(default_factory=Counter)
    shapes: dict[str, set[tuple[int, ...]]] = field(default_factory=lambda: defaultdict(set))
    features: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (in, out)
    max_calls: Counter = field(default_factory=Counter)  # most calls seen in one micro-batch


def clip_lengths(cfg: Config) -> list[int]:
    low = cfg.data.random_clip_min_frames
    return [cfg.data.clip_frames] if low is None else list(range(low, cfg.data.clip_frames + 1))


def trace_training_gemms(cfg: Config, names: list[str]) -> GemmTrace:
    """Run the training objective on meta tensors and record every call of the named linears."""
    # The attention kernel does not change any linear's shape; SDPA is the one that runs on meta.
    model_cfg = dataclasses.replace(cfg.model, attention="sdpa")
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # leave the training RNG untouched
        model = build_model(model_cfg)
    model.train()
    objective = build_objective(model_cfg, cfg.diffusion)
    trace = GemmTrace()
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        linear = modules[name]
        trace.features[name] = (linear.in_features, linear.out_features)
        handles.append(linear.register_forward_pre_hook(_recorder(trace, name)))
    m = cfg.model
    try:
        for frames in clip_lengths(cfg):
            latents = torch.empty(cfg.data.batch_size, frames, m.latent_channels, m.latent_height,
                                  m.latent_width, device="meta")
            actions = (torch.zeros(cfg.data.batch_size, frames, dtype=torch.long, device="meta")
                       if m.num_actions > 0 else None)
            trace.calls.clear()
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                objective(model, latents, actions)
            for name, count in trace.calls.items():
                trace.max_calls[name] = max(trace.max_calls[name], count)
    finally:
        for handle in handles:
            handle.remove()
    return trace


def _recorder(trace: GemmTrace, name: str):
    def hook(module: nn.Module, args: tuple) -> None:
        trace.calls[name] += 1
        trace.shapes[name].add(tuple(args[0].shape))

    return hook


def check_gemm_shapes(trace: GemmTrace, cfg: Fp8Config) -> None:
    """Every FP8 GEMM dimension must be a multiple of the recipe's alignment."""
    align = alignment(cfg.recipe)
    problems = []
    for name, (fan_in, fan_out) in trace.features.items():
        bad_features = [f"{label} {size}" for label, size in (("in_features", fan_in), ("out_features", fan_out))
                        if size % align]
        bad_tokens = sorted({_tokens(s) for s in trace.shapes[name] if _tokens(s) % align})
        if bad_features:
            problems.append(f"{name}: {', '.join(bad_features)} (change model.width / model.mlp_ratio)")
        if bad_tokens:
            problems.append(f"{name}: tokens per micro-batch {bad_tokens} (data.batch_size x frames x tokens "
                            "per frame; change data.batch_size, data.clip_frames/random_clip_min_frames, "
                            "diffusion.target_window or the latent/patch size)")
    if problems:
        listed = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise Fp8Error(f"FP8 recipe {cfg.recipe!r} needs every GEMM dimension to be a multiple of {align}; "
                       f"these layers do not:\n  {listed}\nFix the shapes, or keep the layers in high precision "
                       "with precision.fp8.exclude=[<name or glob>]")


def check_repeated_calls(trace: GemmTrace, cfg: Fp8Config) -> None:
    """With delayed scaling and amax reduction, a module may run only once per FP8 autocast region."""
    if not (cfg.backend == "te" and cfg.recipe == "delayed" and cfg.reduce_amax):
        return
    repeated = {name: count for name, count in trace.max_calls.items() if count > 1}
    if repeated:
        listed = ", ".join(f"{n} ({c} calls)" for n, c in list(repeated.items())[:8])
        raise Fp8Error("with precision.fp8.recipe=delayed and reduce_amax, Transformer Engine reduces amaxes once "
                       f"per autocast region, so a module must not run twice inside it; these do: {listed}. "
                       "Batch the calls into one, or use precision.fp8.recipe=current")


def _tokens(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1])


def run_preflight(cfg: Config, names: list[str], device: torch.device) -> GemmTrace:
    """All pre-flight checks, in the order that gives the most useful first error."""
    check_hardware(cfg.precision.fp8, device)
    trace = trace_training_gemms(cfg, names)
    check_gemm_shapes(trace, cfg.precision.fp8)
    check_repeated_calls(trace, cfg.precision.fp8)
    return trace
