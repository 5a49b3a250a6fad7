"""Leave-one-out layer importance of a dense causal model: the held-out flow-matching loss with
each block skipped (replaced by the identity), compared with the full model.

Every evaluation uses the same noise, timesteps and clean-context draws (a fixed seed in a forked
RNG), so the differences come from the skipped layer alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scd_train.config import Config
from scd_train.diffusion.objective import build_objective
from scd_train.models.causal_dit import CausalDiT


def _held_out_loss(model: CausalDiT, cfg: Config, latents: Tensor, actions: Tensor | None, seeds: list[int]) -> float:
    objective = build_objective(cfg.model, cfg.diffusion)
    total = 0.0
    for seed in seeds:
        with torch.random.fork_rng(devices=[latents.device] if latents.is_cuda else []):
            torch.manual_seed(seed)
            total += float(objective(model, latents, actions).loss)
    return total / len(seeds)


@torch.no_grad()
def layer_importance(model: CausalDiT, cfg: Config, latents: Tensor, actions: Tensor | None,
                     seeds: tuple[int, ...] = (0, 1)) -> dict:
    """Loss of the full model and, per layer, the loss with that layer skipped."""
    if not isinstance(model, CausalDiT):
        raise TypeError(f"layer importance needs a dense causal model, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    base = _held_out_loss(model, cfg, latents, actions, list(seeds))
    layers = []
    for index, block in enumerate(model.blocks):
        handle = block.register_forward_hook(lambda module, args, output: args[0])
        try:
            loss = _held_out_loss(model, cfg, latents, actions, list(seeds))
        finally:
            handle.remove()
        layers.append({"layer": index, "loss_without": loss, "increase": loss - base,
                       "relative_increase": (loss - base) / base if base > 0 else float("nan")})
    model.train(was_training)
    ranked = sorted(layers, key=lambda r: r["increase"])
    return {"full_model_loss": base, "layers": layers, "least_important_first": [r["layer"] for r in ranked],
            "clips": int(latents.shape[0]), "frames": int(latents.shape[1]), "seeds": list(seeds)}
