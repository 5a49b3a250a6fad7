"""Start ``scd_train.train`` with every rank reading the same clips and drawing the same noise.

The ranks' gradients are then identical, so their average equals the gradient of one process on
one rank's batch: a distributed run must reproduce the single-process run step for step, which
isolates what the backend does (sharding, reduction, optimizer, EMA) from data sharding.
"""

from __future__ import annotations

import sys

import scd_train.trainer as trainer_module

_build_loader = trainer_module.build_train_loader
_seed = trainer_module.seed_everything


def _rank_zero_loader(cfg, rank=0, world_size=1):  # noqa: ARG001
    return _build_loader(cfg, 0, 1)


def _rank_zero_seed(seed, rank):  # noqa: ARG001
    _seed(seed, 0)


trainer_module.build_train_loader = _rank_zero_loader
trainer_module.seed_everything = _rank_zero_seed

if __name__ == "__main__":
    from scd_train.train import main

    sys.exit(main(sys.argv[1:]))
