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
import contextlib  # noqa: E402
import shutil  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

from scd_train.cli import command  # noqa: E402
from scd_train.config import ignored_settings, load_config  # noqa: E402
from scd_train.errors import ScdError, ScdWarning  # noqa: E402


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
    preflight(cfg)
    from scd_train.parallel.launch_env import read_launch_env

    read_launch_env(os.environ)  # a broken launch fails in a second, before the heavy imports
    from scd_train.trainer import Trainer

    # Every failure with a message (config, data, hardware, a diverged loss) is a ScdError that the
    # command wrapper prints once; with an error there is no closing barrier: other ranks may be
    # blocked in a collective, and the launcher tears them down once this process exits non-zero.
    with _run_dir_kept_on_failed_start(Path(cfg.train.run_dir)):
        trainer = Trainer(cfg)
    result = trainer.run()
    trainer.runtime.shutdown()
    if trainer.runtime.is_main:
        print(f"{result.status} at step {result.step}; run directory: {result.run_dir}")
    if trainer.runtime.world_size > 1:
        _exit_without_finalization(0)
    return 0


def preflight(cfg) -> None:
    """Checks that need no model, data or process group, before anything heavy is imported or written."""
    if cfg.train.backend == "deepspeed" and cfg.train.deepspeed_config is not None:
        from scd_train.parallel.deepspeed_config import build_deepspeed_config

        # the launcher's WORLD_SIZE is what the process group will have
        build_deepspeed_config(cfg, bf16=False, world_size=int(os.environ.get("WORLD_SIZE", "1") or 1))


@contextlib.contextmanager
def _run_dir_kept_on_failed_start(run_dir: Path) -> Iterator[None]:
    """A start that fails (bad data, hardware, checkpoint) leaves the run directory as it found it: a new
    one is removed again, an existing one gets its config.yaml and env.json back."""
    existed = run_dir.is_dir()
    saved = {name: (run_dir / name).read_bytes() if (run_dir / name).is_file() else None
             for name in ("config.yaml", "env.json")}
    try:
        yield
    except ScdError:
        _close_log_files(run_dir)
        if os.environ.get("RANK", "0") in ("0", ""):
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                for name, content in saved.items():
                    target = run_dir / name
                    if content is None:
                        target.unlink(missing_ok=True)
                    else:
                        target.write_bytes(content)
        raise


def _close_log_files(run_dir: Path) -> None:
    import logging

    root = logging.getLogger("scd_train")
    for handler in list(root.handlers):
        name = getattr(handler, "baseFilename", None)
        if name is not None and Path(name).parent == run_dir.resolve():
            root.removeHandler(handler)
            handler.close()


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
