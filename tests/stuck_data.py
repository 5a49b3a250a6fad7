"""Start ``scd_train.train`` with a data source that never yields a batch.

Stands in for any loop that makes no progress (a reader blocked on storage, a spinning loader): the
first ``next()`` prints a marker and then spins in Python forever, as a loader with a nonsensical
batch size once did. A stop request must still end such a run within ``train.stop_grace_s``.
"""

from __future__ import annotations

import sys

import scd_train.trainer as trainer_module

STUCK_MARKER = "data source stuck"


class NeverYields:
    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        print(STUCK_MARKER, file=sys.stderr, flush=True)
        while True:
            pass
        yield  # pragma: no cover - a generator that never gets here

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def main(argv: list[str]) -> int:
    """``scd_train.train.main`` with the never-yielding data source (patched here only, never on import)."""
    build_loader = trainer_module.build_train_loader

    def never_yielding_loader(cfg, rank=0, world_size=1):
        return NeverYields(build_loader(cfg, rank, world_size))

    trainer_module.build_train_loader = never_yielding_loader
    from scd_train.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
