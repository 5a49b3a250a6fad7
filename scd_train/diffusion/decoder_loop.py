"""SCD's per-frame decoder loop: the T Euler steps that render one frame, eager or compiled.

Every step of every frame has the same shapes (the noisy frame, the encoder context of the
previous frame, the conditioning of the step), so the loop compiles well:

* ``eager``: the steps call the decoder as written;
* ``compile``: each step is one ``torch.compile``d graph (``EulerStep``), reused by every step
  and frame (a new step count or guidance scale compiles again);
* ``graph`` (CUDA only): the compiled steps of a whole frame are captured into one CUDA graph and
  replayed per frame from static input buffers, which removes the per-kernel launch cost that
  bounds small decoders. A capture is kept only where it pays: at warm-up one replay is timed
  against one compiled frame and the faster path is used.

Nothing here changes the model: the decoder module is wrapped, never replaced, so training,
checkpoints (state dict keys) and the eager path are untouched.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scd_train.errors import ScdWarning
from scd_train.models.block import StepConditioning, StepsConditioning

LOOP_MODES = ("auto", "on", "off")


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


def resolve_loop(mode: str, device: torch.device) -> str:
    """``eager``, ``compile`` or ``graph`` for the setting ``mode`` (auto / on / off) on ``device``.

    "auto" compiles on CUDA only: on a CPU compilation takes about a minute, which pays off in a
    long stream but not in a short rollout.
    """
    if mode not in LOOP_MODES:
        raise ValueError(f"decoder loop mode {mode!r}: expected one of {', '.join(LOOP_MODES)}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return "eager"
    if device.type == "cpu" and os.environ.get("ATEN_CPU_CAPABILITY"):
        # torch 2.14's inductor emits CPU code that returns NaN for this loop when the ATen kernels'
        # instruction set is pinned below the CPU's (seen with avx2 on an AVX-512 machine)
        warnings.warn(f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} is set: the decoder loop runs "
                      "eagerly on this CPU (compiled code is unreliable with a pinned kernel instruction set); "
                      "unset it to compile", ScdWarning, stacklevel=2)
        return "eager"
    return "graph" if device.type == "cuda" and torch.cuda.is_available() else "compile"


class EulerStep(nn.Module):
    """One Euler step of the flow ODE, x + dt * v, with classifier-free guidance when
    ``cfg_scale`` is given (the batch then holds the conditional then the unconditional half of
    the context and conditioning). Holds the decoder without owning it: no parameters of its own.
    """

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, x: Tensor, dt: Tensor, context: Tensor, cond_act: Tensor, blocks: list, output: tuple,
                cfg_scale: float | None = None) -> Tensor:
        conditioning = StepConditioning(cond_act, blocks, output)
        if cfg_scale is None:
            v = self.decoder(x, None, context, conditioning=conditioning)
        else:
            v_cond, v_uncond = self.decoder(torch.cat([x, x]), None, context, conditioning=conditioning).chunk(2)
            v = guided_velocity(v_cond.float(), v_uncond.float(), cfg_scale)
        return x + dt * (v if v.dtype == torch.float32 else v.float())


def run_steps(step, x: Tensor, dts: Tensor, context: Tensor, steps: list[StepConditioning],
              cfg_scale: float | None) -> Tensor:
    """The T steps of one frame: the function ``DecoderLoop`` runs eagerly, compiled or captured."""
    for dt, cond in zip(dts.unbind(0), steps):
        x = step(x, dt, context, cond.cond_act, cond.blocks, cond.output, cfg_scale)
    return x


@dataclass
class _Capture:
    """A CUDA graph of one frame's steps and the static buffers it reads and writes."""

    graph: torch.cuda.CUDAGraph
    x: Tensor
    dts: Tensor
    context: Tensor
    conditioning: StepsConditioning
    out: Tensor
    pays: bool = True

    def replay(self, x: Tensor, dts: Tensor, context: Tensor, conditioning: StepsConditioning) -> Tensor:
        self.x.copy_(x)
        self.dts.copy_(dts)
        self.context.copy_(context)
        for static, new in zip(self.conditioning.tensors(), conditioning.tensors()):
            static.copy_(new)
        self.graph.replay()
        return self.out.clone()


class DecoderLoop:
    """Runs a stream's per-frame decoder steps in the mode ``resolve_loop`` picks.

    ``run`` takes the frame's starting noise x (B, C, H, W), the per-step sizes ``dts`` (T,), the
    decoder context (B', N, D) and the steps' conditioning (leading dim T), with B' = 2B under
    guidance. ``mode`` may be changed between frames (e.g. to "eager").
    """

    def __init__(self, decoder: nn.Module, mode: str, device: torch.device) -> None:
        self.decoder = decoder
        self.device = device
        self.mode = resolve_loop(mode, device)
        self._compiled = None
        self._captures: dict[tuple, _Capture] = {}

    def step_fn(self, x: Tensor, dts: Tensor, context: Tensor, conditioning: StepsConditioning,
                cfg_scale: float | None):
        """The per-step callable of the current mode (the compiled graph once compiled)."""
        if self.mode == "eager":
            return EulerStep(self.decoder)
        if self._compiled is None:
            # One eager step first: whatever the decoder memoises on first use (its RoPE tables)
            # then exists, so the traced graph sees the steady state and never recompiles for it.
            first = conditioning.steps()[0]
            EulerStep(self.decoder)(x, dts[0], context, first.cond_act, first.blocks, first.output, cfg_scale)
            self._compiled = torch.compile(EulerStep(self.decoder), dynamic=False)
        return self._compiled

    def run(self, x: Tensor, dts: Tensor, context: Tensor, conditioning: StepsConditioning,
            cfg_scale: float | None) -> Tensor:
        if self.mode == "graph":
            capture = self._capture_for(x, dts, context, conditioning, cfg_scale)
            if capture.pays:
                return capture.replay(x, dts, context, conditioning)
        step = self.step_fn(x, dts, context, conditioning, cfg_scale)
        return run_steps(step, x, dts, context, conditioning.steps(), cfg_scale)

    def warm_up(self, x: Tensor, dts: Tensor, context: Tensor, conditioning: StepsConditioning,
                cfg_scale: float | None) -> None:
        """Compile (and capture) for these shapes now, outside any timed region."""
        if self.mode == "eager":
            return
        if self.mode == "graph":
            self._capture_for(x, dts, context, conditioning, cfg_scale)
        else:
            step = self.step_fn(x, dts, context, conditioning, cfg_scale)
            run_steps(step, x, dts, context, conditioning.steps(), cfg_scale)

    def _capture_for(self, x: Tensor, dts: Tensor, context: Tensor, conditioning: StepsConditioning,
                     cfg_scale: float | None) -> _Capture:
        key = (dts.shape[0], tuple(x.shape), tuple(context.shape), cfg_scale, torch.is_autocast_enabled("cuda"),
               torch.get_autocast_dtype("cuda"))
        if key not in self._captures:
            self._captures[key] = self._capture(x, dts, context, conditioning, cfg_scale)
        return self._captures[key]

    def _capture(self, x: Tensor, dts: Tensor, context: Tensor, conditioning: StepsConditioning,
                 cfg_scale: float | None) -> _Capture:
        step = self.step_fn(x, dts, context, conditioning, cfg_scale)
        static = StepsConditioning(conditioning.cond_act.clone(),
                                   [tuple(t.clone() for t in terms) for terms in conditioning.blocks],
                                   tuple(t.clone() for t in conditioning.output))
        x_s, dts_s, context_s = x.clone(), dts.clone(), context.clone()
        steps = static.steps()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # compile and let the allocator settle before capturing
            for _ in range(3):
                run_steps(step, x_s, dts_s, context_s, steps, cfg_scale)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run_steps(step, x_s, dts_s, context_s, steps, cfg_scale)
        capture = _Capture(graph, x_s, dts_s, context_s, static, out)
        capture.pays = self._replay_is_faster(capture, step, x, dts, context, conditioning, cfg_scale)
        return capture

    def _replay_is_faster(self, capture: _Capture, step, x, dts, context, conditioning, cfg_scale) -> bool:
        def seconds(fn) -> float:
            torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(self.device)
            return time.perf_counter() - start

        steps = conditioning.steps()
        compiled = min(seconds(lambda: run_steps(step, x, dts, context, steps, cfg_scale)) for _ in range(2))
        replayed = min(seconds(lambda: capture.replay(x, dts, context, conditioning)) for _ in range(2))
        return replayed < compiled
