"""Print a config's parameter counts without allocating weights.

    python -m scd_train.models configs/scd_m.yaml configs/causal_dit_m.yaml
"""

from __future__ import annotations

import sys

import torch

from scd_train.config import load_config
from scd_train.models import build_model


def parameter_counts(config_path: str) -> dict[str, int]:
    cfg = load_config(config_path)
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()
              if cfg.model.arch == "scd"}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def main(argv: list[str] | None = None) -> int:
    for path in argv if argv is not None else sys.argv[1:]:
        counts = parameter_counts(path)
        print(path + ": " + ", ".join(f"{k} {v:,} ({v / 1e6:.2f}M)" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
