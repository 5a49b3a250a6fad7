"""Low-precision training: which layers run in FP8, whether they can, and the conversion itself.

Models stay plain ``nn.Linear``; ``prepare_fp8`` converts a built model in place before the
training backend wraps it (the order torchao and Transformer Engine both need: convert, then
checkpoint and shard).
"""

from scd_train.precision.fp8 import Fp8Training, prepare_fp8
from scd_train.precision.selection import Fp8Error, Fp8Selection, select_fp8_linears

__all__ = ["Fp8Error", "Fp8Selection", "Fp8Training", "prepare_fp8", "select_fp8_linears"]
