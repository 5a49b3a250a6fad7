"""Which linear layers run in FP8.

Only the per-token GEMMs of transformer blocks are eligible: qkv, the attention output and the
two MLP layers. Everything else stays in high precision automatically, because FP8 costs more
than it saves there or the shapes cannot meet the GEMM alignment rules:

- timestep/action/patch embeddings and output projections (outside the blocks): few tokens or
  narrow feature dims (e.g. latent channels);
- adaLN modulation layers inside the blocks: one row per frame (batch x frames), not per token.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from scd_train.config import ConfigError, Fp8Config
from scd_train.models import transformer_blocks

SCOPES = ("encoder", "decoder", "all")
OUTSIDE_BLOCKS = "embedding or output layer outside the transformer blocks"
MODULATION = "per-frame adaLN modulation (one row per frame, not per token)"


class Fp8Error(ConfigError):
    """FP8 cannot run as configured here (hardware, shapes, layer names); the message names the
    module or setting and what to change."""


@dataclass
class Fp8Selection:
    selected: list[str]  # linear names that run in FP8, in model order
    auto_excluded: dict[str, str] = field(default_factory=dict)  # name -> why it stays high precision
    user_excluded: list[str] = field(default_factory=list)


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def eligibility(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """(eligible linear names, auto-excluded name -> reason)."""
    blocks = [name for name, _ in transformer_blocks(model)]
    eligible, excluded = [], {}
    for name in linear_names(model):
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is None:
            excluded[name] = OUTSIDE_BLOCKS
        elif "modulation" in name[len(block) + 1:]:
            excluded[name] = MODULATION
        else:
            eligible.append(name)
    return eligible, excluded


def _matches(name: str, entry: str) -> bool:
    if entry == "all":
        return True
    if entry in ("encoder", "decoder"):
        return name.startswith(entry + ".")
    return fnmatch.fnmatchcase(name, entry)


def select_fp8_linears(model: nn.Module, cfg: Fp8Config) -> Fp8Selection:
    """Resolve ``precision.fp8.modules`` / ``exclude`` against the model's linear layers."""
    eligible, auto_excluded = eligibility(model)
    chosen: set[str] = set()
    for entry in cfg.modules:
        hits = [n for n in eligible if _matches(n, entry)]
        if not hits:
            raise Fp8Error(_no_match_message(entry, eligible, auto_excluded))
        chosen.update(hits)
    user_excluded = []
    for pattern in cfg.exclude:
        hits = [n for n in chosen if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise Fp8Error(f"precision.fp8.exclude entry {pattern!r} matches no FP8-selected linear layer; "
                           f"selected: {_preview(sorted(chosen))}")
        chosen.difference_update(hits)
        user_excluded.extend(hits)
    selected = [n for n in eligible if n in chosen]
    if not selected:
        raise Fp8Error("precision.fp8.exclude removes every selected layer; disable precision.fp8.enabled instead")
    return Fp8Selection(selected, auto_excluded, sorted(user_excluded))


def _no_match_message(entry: str, eligible: list[str], auto_excluded: dict[str, str]) -> str:
    kept = [n for n in auto_excluded if _matches(n, entry)]
    if kept:
        reasons = "; ".join(f"{n}: {auto_excluded[n]}" for n in kept[:4])
        return (f"precision.fp8.modules entry {entry!r} matches only layers that stay in high precision "
                f"({reasons}); FP8 applies to per-token block linears, e.g. {_preview(eligible)}")
    scopes = sorted({n.split(".")[0] for n in eligible})
    return (f"precision.fp8.modules entry {entry!r} matches no linear layer of this model "
            f"(top-level scopes with FP8-eligible layers: {', '.join(scopes)}; use 'all' or a glob "
            f"pattern such as {eligible[0].rsplit('.', 1)[0] + '.*'!r})" if eligible else
            f"precision.fp8.modules entry {entry!r}: this model has no FP8-eligible linear layer")


def _preview(names: list[str], limit: int = 6) -> str:
    head = ", ".join(names[:limit])
    return head + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
