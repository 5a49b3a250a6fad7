"""Imports of third-party packages that announce, while being imported, problems only their
authors can act on (torch's pytree registry about torchao's enums; diffusers about optional
torchao tensor types). Users of scd-train can do nothing about them, so they are silenced for the
duration of the import only; later warnings of the same loggers still show."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

IMPORT_NOISE_LOGGERS = ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
