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

from scd_train.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scd-train", description="Train an SCD model or the dense baseline.")
    parser.add_argument("--config", help="YAML config (defaults are SCD-M)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 train.steps=100")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment is used instead")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"scd-train: {exc}", file=sys.stderr)
        return 2
    from scd_train.parallel.launch_env import LaunchEnvError, read_launch_env

    try:
        read_launch_env(os.environ)  # a broken launch fails in a second, before the heavy imports
    except LaunchEnvError as exc:
        print(f"scd-train: {exc}", file=sys.stderr)
        return 2
    from scd_train.data.manifest import ManifestError
    from scd_train.errors import ScdError
    from scd_train.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    # settings that only fail against the model, the data or the hardware (e.g. FP8, a shard manifest),
    # and a run directory, resume or launch environment that cannot be used as given
    except (ConfigError, ManifestError) as exc:
        print(f"scd-train: {exc}", file=sys.stderr)
        return 2
    except ScdError as exc:
        print(f"scd-train: {exc}", file=sys.stderr)
        return exc.exit_code
    # On an error there is no closing barrier: other ranks may be blocked in a collective, and
    # the launcher tears them down once this process exits non-zero.
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
