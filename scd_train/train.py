"""Entry point: ``scd-train``, ``python -m scd_train.train``, ``torchrun ... -m scd_train.train``
and ``deepspeed scd_train/train.py``.

    scd-train --config configs/tiny.yaml train.steps=200 optim.decoder_lr_ratio=2.0
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Started as a file (the deepspeed launcher does this): keep this folder's module names
    # (config, data, ...) from shadowing top-level packages.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

import argparse  # noqa: E402
import warnings  # noqa: E402

from scd_train.cli import command  # noqa: E402
from scd_train.config import ignored_settings, load_config  # noqa: E402
from scd_train.errors import ScdWarning  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scd-train", description="Train an SCD model or the dense baseline.",
                                     epilog="--debug (or SCD_DEBUG=1) shows the traceback of an error.")
    parser.add_argument("--config", help="YAML config (defaults are SCD-M)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 train.steps=100")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment is used instead")
    return parser.parse_args(argv)


@command("scd-train")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_config(args.config, args.overrides)
    for note in ignored_settings(cfg):
        warnings.warn(note, ScdWarning, stacklevel=1)
    from scd_train.trainer import Trainer

    # Every failure with a message (config, data, hardware, a diverged loss) is a ScdError that the
    # command wrapper prints once; with an error there is no closing barrier: other ranks may be
    # blocked in a collective, and the launcher tears them down once this process exits non-zero.
    trainer = Trainer(cfg)
    result = trainer.run()
    trainer.runtime.shutdown()
    if trainer.runtime.is_main:
        print(f"{result.status} at step {result.step}; run directory: {result.run_dir}")
    if trainer.runtime.world_size > 1:
        _exit_without_finalization(0)
    return 0


def _exit_without_finalization(code: int) -> None:
    """Leave after a clean distributed shutdown without interpreter finalization, where gloo can
    abort (SIGABRT from a still-joinable C++ thread) and turn a finished run into a failed job."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
