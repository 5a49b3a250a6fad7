"""World models scored against the real game: rollout error per horizon and action accuracy.

Every model starts from the same held-out states with the same actions and the same noise. Real
frames reach the models through the recording's resize rule and the training set's VAE and latent
normalization, exactly as training clips did; predictions are decoded by that VAE and compared with
the real frames in pixel space, so a model's score includes its VAE's error. Two references sit
beside the models: ``copy_last`` repeats the last real context frame, and ``vae_ceiling`` is the
VAE's own reconstruction of the real frames (what a perfect latent predictor would score).

Action accuracy: for each state and ordered pair of branches (a, b) whose real rollouts differ, a
model is right when its rollout under a's actions is closer (pixel MSE over the branch) to the real
rollout under a than to the real rollout under b; a tie counts one half. Every branch of a state is
rolled out with the same noise, so a model that ignores actions gives identical rollouts and scores
exactly 50%, as does copy_last.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from scd_train.diffusion.sampling import SamplerSettings, generate
from scd_train.eval.emulator import EmulatorProtocol, GameState
from scd_train.eval.evaluate import Candidate
from scd_train.eval.metrics import per_frame_ssim, psnr_from_mse

REFERENCES = ("copy_last", "vae_ceiling")


def to_unit(frames: np.ndarray) -> Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float() / 255.0


def to_uint8_chw(frames: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3)


@dataclass
class Predictions:
    """Pixels in [0, 1]: rollout (N, H, 3, S, S) and branches (N, B, L, 3, S, S) for every state."""

    rollout: Tensor
    branches: Tensor
    seconds: float = 0.0


@dataclass
class Truth:
    context: Tensor  # (N, C, 3, S, S)
    rollout: Tensor  # (N, H, 3, S, S)
    branches: Tensor  # (N, B, L, 3, S, S)

    @classmethod
    def from_states(cls, states: list[GameState]) -> Truth:
        return cls(to_unit(np.stack([s.context_frames for s in states])),
                   to_unit(np.stack([s.rollout_frames for s in states])),
                   to_unit(np.stack([s.branch_frames for s in states])))


def sampler_for(cfg, protocol: EmulatorProtocol) -> SamplerSettings:
    d = cfg.diffusion
    return SamplerSettings(steps=protocol.steps or d.sample_steps, cfg_scale=d.cfg_scale,
                           cfg_mode=d.cfg_mode if cfg.model.arch == "scd" else "action",
                           num_train_timesteps=d.num_train_timesteps)


@torch.no_grad()
def model_predictions(candidate: Candidate, states: list[GameState], encode: Callable[[Tensor], Tensor],
                      decode: Callable[[Tensor], Tensor], protocol: EmulatorProtocol,
                      device: torch.device) -> Predictions:
    """Roll the model out from every state under the rollout actions and under each branch's actions."""
    settings = sampler_for(candidate.cfg, protocol)
    rollouts, branches = [], []
    start = time.perf_counter()
    for first in range(0, len(states), protocol.batch):
        group = states[first:first + protocol.batch]
        context = encode(to_uint8_chw(np.stack([s.context_frames for s in group]))).to(device)
        context_actions = np.stack([s.context_actions for s in group])
        seed = protocol.seed + first  # the same noise for every branch of a state (and for every model)

        def roll(future: np.ndarray, context=context, context_actions=context_actions, seed=seed) -> Tensor:
            frames = _rollout(candidate, context, np.concatenate([context_actions, future], axis=1),
                              future.shape[1], settings, seed, device)
            return decode(frames.cpu())

        rollouts.append(roll(np.stack([s.rollout_actions for s in group])))
        per_branch = [roll(np.stack([s.branch_actions[b] for s in group])) for b in range(protocol.branches)]
        branches.append(torch.stack(per_branch, dim=1))
    return Predictions(torch.cat(rollouts), torch.cat(branches), time.perf_counter() - start)


def _rollout(candidate: Candidate, context: Tensor, actions: np.ndarray, frames: int, settings: SamplerSettings,
             seed: int, device: torch.device) -> Tensor:
    """The ``frames`` generated latents (B, frames, C, h, w) after ``context``."""
    use_actions = candidate.cfg.model.num_actions > 0
    acts = torch.from_numpy(actions).to(device) if use_actions else None
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(candidate.model, context, acts, frames, settings, generator)
    return out.frames[:, context.shape[1]:]


def reference_predictions(truth: Truth, encode, decode) -> dict[str, Predictions]:
    """copy_last (the last real context frame, held) and vae_ceiling (the VAE's reconstruction)."""
    last = truth.context[:, -1:]
    copy_last = Predictions(last.expand_as(truth.rollout).clone(),
                            last[:, None].expand_as(truth.branches).clone())

    def reconstruct(frames: Tensor) -> Tensor:
        pixels = (frames * 255).round().to(torch.uint8)
        return decode(encode(pixels))

    return {"copy_last": copy_last, "vae_ceiling": Predictions(reconstruct(truth.rollout), reconstruct(truth.branches))}


def frame_errors(prediction: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Per state and frame: MSE and SSIM, each (N, T)."""
    n, t = truth.shape[:2]
    flat_p, flat_t = prediction.reshape(n * t, *truth.shape[2:]), truth.reshape(n * t, *truth.shape[2:])
    mse = (flat_p.double() - flat_t.double()).pow(2).flatten(1).mean(1)
    return mse.view(n, t), per_frame_ssim(flat_p, flat_t).view(n, t)


def horizon_scores(prediction: Tensor, truth: Tensor, horizons: list[int]) -> dict:
    """PSNR and SSIM of generated frame k (k in ``horizons``), averaged over states, and the full curves."""
    mse, ssim = frame_errors(prediction, truth)
    psnr = psnr_from_mse(mse)  # per state and frame, capped for exact frames
    table = {str(k): {"psnr": float(psnr[:, k - 1].mean()), "ssim": float(ssim[:, k - 1].mean()),
                      "mse": float(mse[:, k - 1].mean())} for k in horizons}
    return {"horizons": table, "curve": {"psnr": psnr.mean(0).tolist(), "ssim": ssim.mean(0).tolist()}}


@dataclass
class AccuracyResult:
    accuracy: float | None  # None when no pair of branches differed in the real game
    pairs: int
    identical_pairs: int
    per_state: list[float | None] = field(default_factory=list)


def action_accuracy(prediction: Tensor, truth: Tensor) -> AccuracyResult:
    """``prediction`` and ``truth``: (N, B, L, 3, S, S). See the module docstring for the rule."""
    scores, identical, per_state = [], 0, []
    for n in range(truth.shape[0]):
        pred, real = prediction[n].double(), truth[n].double()
        distance = (pred[:, None] - real[None]).pow(2).flatten(2).mean(2)  # [a, b] = d(model under a, real b)
        real_gap = (real[:, None] - real[None]).pow(2).flatten(2).mean(2)
        mine = []
        for a in range(real.shape[0]):
            for b in range(real.shape[0]):
                if a == b:
                    continue
                if real_gap[a, b] == 0:  # the actions made no difference in the game: nothing to tell apart
                    identical += 1
                    continue
                own, other = distance[a, a], distance[a, b]
                mine.append(1.0 if own < other else 0.5 if own == other else 0.0)
        scores += mine
        per_state.append(float(np.mean(mine)) if mine else None)
    return AccuracyResult(float(np.mean(scores)) if scores else None, len(scores), identical, per_state)


def score(predictions: Predictions, truth: Truth, protocol: EmulatorProtocol) -> dict:
    accuracy = action_accuracy(predictions.branches, truth.branches)
    return {**horizon_scores(predictions.rollout, truth.rollout, protocol.horizons),
            "action_accuracy": accuracy.accuracy, "action_pairs": accuracy.pairs,
            "identical_real_pairs": accuracy.identical_pairs, "action_accuracy_per_state": accuracy.per_state,
            "seconds": predictions.seconds}
