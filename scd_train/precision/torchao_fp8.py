"""FP8 through torchao.float8: the selected ``nn.Linear`` layers become ``Float8Linear``.

Scaling is dynamic (computed from each tensor when it is cast), so there is no scaling state to
checkpoint: a ``Float8Linear`` has exactly the parameters of the ``nn.Linear`` it replaces, and
checkpoints move freely between FP8 and bf16 runs. On CPU the GEMMs run in torchao's emulation
mode (``emulate=True``): real float8 casts, matmul in high precision; for numerics and tests only.
"""

from __future__ import annotations

import torch
from torch import nn

from scd_train.config import Fp8Config
from scd_train.third_party import quiet_imports


def float8_linear_config(cfg: Fp8Config, device: torch.device):
    with quiet_imports():
        from torchao.float8 import CastConfig, Float8LinearConfig

    emulate = device.type == "cpu"
    if cfg.recipe == "rowwise":
        base = Float8LinearConfig.from_recipe_name("rowwise")
        return Float8LinearConfig(
            cast_config_input=base.cast_config_input, cast_config_weight=base.cast_config_weight,
            cast_config_grad_output=base.cast_config_grad_output,
            round_scales_to_power_of_2=base.round_scales_to_power_of_2, emulate=emulate)
    grad_output = CastConfig(target_dtype=torch.float8_e4m3fn) if cfg.fp8_format == "e4m3" else CastConfig()
    return Float8LinearConfig(cast_config_grad_output=grad_output, emulate=emulate,
                              enable_fsdp_float8_all_gather=cfg.fsdp_float8_all_gather)


def convert_torchao(model: nn.Module, names: list[str], cfg: Fp8Config, device: torch.device) -> int:
    """Swap the named linears for ``Float8Linear`` in place; returns how many were swapped."""
    from torchao.float8 import convert_to_float8_training

    wanted = set(names)
    convert_to_float8_training(model, config=float8_linear_config(cfg, device),
                               module_filter_fn=lambda module, fqn: fqn in wanted)
    return sum(1 for name, m in model.named_modules() if name in wanted and is_float8_linear(m))


def is_float8_linear(module: nn.Module) -> bool:
    from torchao.float8.float8_linear import Float8Linear

    return isinstance(module, Float8Linear)
