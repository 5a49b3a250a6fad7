"""The sections of ``bench/gpu_suite.py``, each a function ``run(ctx)`` that fills ``ctx.results``.

Budgets are seconds on a GPU (``full``) and on CPU with ``--smoke``; the suite runs each section in
its own process and stops it at its budget, keeping whatever it had recorded by then.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SectionSpec:
    name: str
    module: str  # module under gpu_sections holding ``run(ctx)``
    budget_s: float  # on a GPU
    smoke_budget_s: float  # with --smoke on CPU
    summary: str


SECTIONS = (
    SectionSpec("correctness", "correctness", 120.0, 60.0,
                "FlexAttention mask == SDPA boolean mask (forward, gradients); KV-cached streaming == "
                "uncached forward; compiled decoder loop == eager"),
    SectionSpec("training", "training", 100.0, 60.0,
                "SCD-M training step under FSDP2 on one rank, activation checkpointing on and off"),
    SectionSpec("fp8", "fp8", 100.0, 60.0, "torchao FP8 on the encoder against bf16, same weights and data"),
    SectionSpec("inference", "inference", 130.0, 60.0,
                "SCD-M against the dense 12-layer baseline per generated frame, eager and compiled"),
)
