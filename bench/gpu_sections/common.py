"""What every section shares: its context (device, sizes, clock, partial results) and helpers.

A section writes its results file after every measurement, atomically, so a section stopped at
its time budget (or crashing in a CUDA kernel) still hands the suite what it had measured.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
NEEDS_CUDA = "needs CUDA"

# Tiny dims for --smoke: the SCD-M code path at a size two busy CPU cores finish in seconds.
SMOKE_MODEL = ["model.latent_channels=4", "model.patch_size=2", "model.width=64", "model.num_heads=2",
               "model.head_dim=32", "model.rope_axes=[8,12,12]", "model.encoder_layers=2",
               "model.decoder_layers=1", "model.layers=3"]
# The dense baseline keeps SCD-M's total depth (8 + 4 = 12 layers); at smoke size 2 + 1 = 3.
SMOKE_DENSE = [o for o in SMOKE_MODEL if not o.startswith(("model.encoder_layers", "model.decoder_layers"))]


class SkipForTime(Exception):
    """Raised by ``ctx.need(seconds)`` when the section's budget cannot fit the next measurement."""


@dataclass
class SectionContext:
    name: str
    device: torch.device
    smoke: bool
    budget_s: float
    results_path: Path
    options: dict = field(default_factory=dict)  # suite-wide settings (e.g. a student run directory)
    results: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def compute_dtype(self) -> torch.dtype:
        """bf16 on CUDA (what training and inference run in); fp32 on CPU, where bf16 matmuls are slow."""
        return torch.bfloat16 if self.cuda else torch.float32

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def time_left(self) -> float:
        return self.budget_s - self.elapsed()

    def need(self, seconds: float, what: str) -> None:
        """Refuse to start ``what`` when less than ``seconds`` of the budget is left; recorded as such."""
        if self.time_left() < seconds:
            raise SkipForTime(f"{what}: skipped for time ({self.time_left():.0f} s of the section's "
                              f"{self.budget_s:.0f} s left, needs about {seconds:.0f} s)")

    def record(self, key: str, value) -> None:
        """Store one finished measurement and write the section's file at once."""
        self.results[key] = value
        self.save()

    def save(self, status: str = "running", error: str | None = None) -> None:
        payload = {"status": status, "seconds": round(self.elapsed(), 2), "results": self.results,
                   "notes": self.notes}
        if error is not None:
            payload["error"] = error
        write_json_atomic(self.results_path, payload)


def failure(exc: BaseException) -> dict:
    """The record of a check or phase that raised: what, and where (the traceback's tail)."""
    import traceback

    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}


def allow_recompiles(limit: int = 64) -> None:
    """A section compiles FlexAttention for many (shape, dtype) pairs in one process; past dynamo's
    default of 8 it would quietly run the rest eagerly, which no check or timing here should see."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


def write_json_atomic(path: Path, payload: dict) -> None:
    """Replace ``path`` in one rename, so a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def model_config(ctx: SectionContext, arch: str, extra: list[str] | None = None):
    """SCD-M (``configs/scd_m.yaml``) or the dense baseline (``configs/causal_dit_m.yaml``); tiny with --smoke."""
    from scd_train.config import load_config

    path = REPO / "configs" / ("scd_m.yaml" if arch == "scd" else "causal_dit_m.yaml")
    overrides = [f"train.device={ctx.device.type}"]
    if ctx.smoke:
        overrides += SMOKE_MODEL if arch == "scd" else SMOKE_DENSE
    return load_config(path, overrides + list(extra or []))


@torch.no_grad()
def randomize(model: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Perturb every parameter: a fresh model's zero-initialised gates and output layers would make
    every comparison pass trivially (all blocks add zero, every velocity is zero)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) * std)
    return model


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def relative_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|: comparable across tensors of any scale."""
    scale = float(b.float().abs().max())
    return max_abs_diff(a, b) / max(scale, 1e-12)


def relative_l2(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||: the error of a whole tensor (a gradient), not of its worst element."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def compare(a: Tensor, b: Tensor, rel_tol: float) -> dict:
    """The record every correctness check leaves: both differences, the tolerance and the verdict."""
    rel = relative_diff(a, b)
    return {"max_abs_diff": max_abs_diff(a, b), "max_rel_diff": rel, "reference_max_abs": float(b.float().abs().max()),
            "rel_tol": rel_tol, "pass": bool(rel <= rel_tol and torch.isfinite(a.float()).all())}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset; None on CPU (no allocator statistics)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def allocated_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / 2**30


def timing_summary(stats) -> dict:
    """A ``metrics.timing.TimingStats`` as JSON, with milliseconds for reading."""
    out = stats.summary()
    out["wall_ms_median"] = stats.median * 1e3
    out["wall_s"] = stats.wall
    out["cpu_s"] = stats.cpu
    return out
