"""Start ``scd_train.distill`` with every rank reading the same clips and drawing the same noise.

Importing ``mirror_ranks`` patches the trainer's loader and seeding (see there), so a distributed
distillation must reproduce the single-process one step for step.
"""

from __future__ import annotations

import sys

import mirror_ranks  # noqa: F401

if __name__ == "__main__":
    from scd_train.distill import main

    sys.exit(main(sys.argv[1:]))
