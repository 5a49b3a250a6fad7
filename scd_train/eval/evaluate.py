"""Roll out every model on the same held-out clips and score the generated frames.

For each batch of clips, each model generates ``trajectories`` continuations per clip from the
same seeds. Frame metrics compare generated frames (the context excluded) with the ground truth;
FVD compares whole videos, context included, one trajectory set at a time, and averages the sets.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from scd_train.config import Config
from scd_train.diffusion.sampling import Rollout, SamplerSettings, generate, settings_from_config
from scd_train.errors import InputError
from scd_train.eval.clips import Decode, EvalClip, batched, stack_clips
from scd_train.eval.feature_metrics import LPIPS, VideoFeatures, frechet_distance
from scd_train.eval.metrics import PSNR_CAP_DB, best_of_k, horizon_scores, selection_rule, video_scores
from scd_train.eval.protocol import EvalProtocol
from scd_train.video import read_mp4, to_hwc_uint8, write_mp4


@dataclass
class Candidate:
    """A model under evaluation, with the config it was trained with."""

    name: str
    model: nn.Module
    cfg: Config
    source: str = ""
    # Guidance scale this entry samples at; None: the protocol's, else the model's diffusion.cfg_scale.
    cfg_scale: float | None = None

    @property
    def history(self) -> str:
        """The kind of history the model read in training (model.encoder_input)."""
        return self.cfg.model.encoder_input


@dataclass
class FeatureNetworks:
    """Optional feature networks; a metric whose network is absent is not computed."""

    lpips: LPIPS | None = None
    fvd: VideoFeatures | None = None


def sampler_settings(cfg: Config, protocol: EvalProtocol, cfg_scale: float | None = None) -> SamplerSettings:
    """The model's own sampling defaults with the protocol's overrides (``cfg_scale``, when given,
    wins over both). The dense baseline has no encoder context to perturb, so its guidance is
    always the null-action kind."""
    if cfg_scale is None:
        cfg_scale = protocol.cfg_scale
    return settings_from_config(cfg.diffusion, protocol.steps, cfg_scale,
                                cfg.diffusion.cfg_mode if cfg.model.arch == "scd" else "action", protocol.compile)


def official_round_trip(truth: Tensor, sample: Tensor, crf: int) -> tuple[Tensor, Tensor]:
    """Both videos (T, 3, H, W) after the reference evaluation's write-then-read of a side-by-side
    H.264 mp4 (ground truth | sample), quantized to 8 bits on the way."""
    width, height = truth.shape[-1], truth.shape[-2]
    panel = np.concatenate([to_hwc_uint8(truth), to_hwc_uint8(sample)], axis=2)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_mp4(panel, Path(tmp) / "pair.mp4", fps=8, crf=crf, preset="medium")
        back = torch.from_numpy(read_mp4(path)).permute(0, 3, 1, 2).float() / 255.0
    back = back[:, :, :height]
    return back[..., :width], back[..., width:2 * width]


@dataclass
class ModelTally:
    trajectories: int
    scores: dict[str, list[list[float]]] = field(default_factory=dict)  # metric -> per video, per trajectory
    fvd_real: list[list[Tensor]] = field(init=False)  # trajectory set -> per batch (b, D) features
    fvd_fake: list[list[Tensor]] = field(init=False)
    first_frame_seconds: list[float] = field(default_factory=list)
    steady_frame_seconds: list[float] = field(default_factory=list)
    settings: SamplerSettings | None = None
    # protocol.horizons, and metric -> per video, per trajectory, per horizon
    horizons: list[int] = field(default_factory=list)
    per_horizon: dict[str, list[list[list[float]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fvd_real = [[] for _ in range(self.trajectories)]
        self.fvd_fake = [[] for _ in range(self.trajectories)]

    def add(self, truth: Tensor, samples: Tensor, protocol: EvalProtocol, nets: FeatureNetworks) -> None:
        """``truth`` (B, F, 3, H, W) and ``samples`` (B, K, F, 3, H, W), pixels in [0, 1]."""
        c = protocol.context
        real_sets: list[list[Tensor]] = [[] for _ in range(self.trajectories)]
        fake_sets: list[list[Tensor]] = [[] for _ in range(self.trajectories)]
        for b in range(truth.shape[0]):
            row: dict[str, list[float]] = {}
            horizon_row: dict[str, list[list[float]]] = {}
            for k in range(self.trajectories):
                t, s = truth[b], samples[b, k]
                if protocol.official:
                    t, s = official_round_trip(t, s, protocol.mp4_crf)
                for name, value in video_scores(s[c:], t[c:], nets.lpips, per_frame_psnr=protocol.official).items():
                    row.setdefault(name, []).append(value)
                if protocol.horizons:
                    for name, values in horizon_scores(s[c:], t[c:], protocol.horizons).items():
                        horizon_row.setdefault(name, []).append(values)
                real_sets[k].append(t)
                fake_sets[k].append(s)
            for name, values in row.items():
                self.scores.setdefault(name, []).append(values)
            for name, values in horizon_row.items():
                self.per_horizon.setdefault(name, []).append(values)
        self.horizons = list(protocol.horizons)
        if nets.fvd is not None:
            self._add_fvd_features(real_sets, fake_sets, nets.fvd, protocol.official)

    def _add_fvd_features(self, real_sets, fake_sets, net: VideoFeatures, official: bool) -> None:
        shared_real = None if official else net(torch.stack(real_sets[0]))  # identical for every k
        for k in range(self.trajectories):
            self.fvd_real[k].append(shared_real if shared_real is not None else net(torch.stack(real_sets[k])))
            self.fvd_fake[k].append(net(torch.stack(fake_sets[k])))

    def add_timing(self, rollout: Rollout) -> None:
        self.first_frame_seconds.append(rollout.first_frame_seconds)
        self.steady_frame_seconds.append(rollout.steady_frame_seconds)

    def summary(self, official: bool) -> dict:
        metrics, selection, trajectory_mean = {}, {}, {}
        for name, rows in self.scores.items():
            table = torch.tensor(rows, dtype=torch.float64)
            rule = selection_rule(name, official)
            metrics[name] = float(best_of_k(table, rule).mean())
            selection[name] = rule
            trajectory_mean[name] = float(table.mean())
        out = {"metrics": metrics, "selection": selection, "trajectory_mean": trajectory_mean,
               "per_video": {name: rows for name, rows in self.scores.items()}}
        if self.fvd_fake[0]:
            per_set = [frechet_distance(torch.cat(self.fvd_real[k]), torch.cat(self.fvd_fake[k]))
                       for k in range(self.trajectories)]
            metrics["fvd"] = float(np.mean(per_set))
            selection["fvd"] = "mean over trajectory sets"
            out["fvd_per_trajectory"] = per_set
        out["timing"] = {
            "first_frame_seconds": float(np.median(self.first_frame_seconds)),
            "steady_frame_seconds": float(np.median(self.steady_frame_seconds)),
            "note": "median over rollout batches; each batch generates batch_clips * trajectories videos at once; "
                    "the first frame includes the context prefill for every model",
        }
        if self.settings is not None:
            out["sampler"] = vars(self.settings).copy()
        if self.per_horizon:
            out["by_horizon"] = self._horizon_summary(official)
        return out

    def _horizon_summary(self, official: bool) -> dict:
        """Per metric, one value per horizon: best trajectory per video (the frame metrics' rule),
        mean over videos."""
        summary: dict = {"horizons": self.horizons}
        for name, rows in self.per_horizon.items():
            table = torch.tensor(rows, dtype=torch.float64)  # (videos, trajectories, horizons)
            rule = selection_rule(name, official)
            best = table.max(dim=1).values if rule == "max" else table.min(dim=1).values
            summary[name] = best.mean(dim=0).tolist()
        return summary


@dataclass
class SheetFrames:
    """Pixels kept for sample sheets: ground truth and trajectory 0 of each model."""

    limit: int
    truth: list[Tensor] = field(default_factory=list)
    samples: dict[str, list[Tensor]] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)

    def add_truth(self, keys: list[str], truth: Tensor) -> None:
        room = max(0, self.limit - len(self.truth))
        self.truth.extend(truth[:room])
        self.keys.extend(keys[:room])

    def add_samples(self, name: str, samples: Tensor) -> None:
        room = max(0, self.limit - len(self.samples.get(name, [])))
        self.samples.setdefault(name, []).extend(samples[:room, 0])


@dataclass
class EvalRun:
    protocol: EvalProtocol
    keys: list[str]
    tallies: dict[str, ModelTally]
    sheet: SheetFrames
    sources: dict[str, str]
    histories: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        import dataclasses

        return {"protocol": dataclasses.asdict(self.protocol), "psnr_cap_db": PSNR_CAP_DB,
                "clips_evaluated": len(self.keys), "clips": self.keys,
                "sources": self.sources, "history": self.histories,
                "models": {name: t.summary(self.protocol.official) for name, t in self.tallies.items()}}


def rollout_pixels(candidate: Candidate, latents: Tensor, actions: Tensor | None, protocol: EvalProtocol,
                   decode: Decode, batch_index: int, device: torch.device) -> tuple[Tensor, Rollout]:
    """(B, K, F, 3, H, W) pixels of K rollouts per clip (context frames included), and the rollout."""
    k = protocol.trajectories
    context = latents[:, :protocol.context].repeat_interleave(k, dim=0).to(device)
    acts = None if actions is None else actions.repeat_interleave(k, dim=0).to(device)
    generator = torch.Generator(device=device).manual_seed(protocol.seed + batch_index)
    rollout = generate(candidate.model, context, acts, protocol.unroll,
                       sampler_settings(candidate.cfg, protocol, candidate.cfg_scale), generator)
    pixels = decode(rollout.frames.cpu())
    return pixels.unflatten(0, (latents.shape[0], k)), rollout


@torch.no_grad()
def evaluate(candidates: list[Candidate], clips: Iterable[EvalClip], decode: Decode, protocol: EvalProtocol,
             nets: FeatureNetworks | None = None, sheet_clips: int = 4,
             device: torch.device | str = "cpu", progress=None) -> EvalRun:
    """Score every candidate on the same clips with the same seeds."""
    nets = nets or FeatureNetworks()
    device = torch.device(device)
    tallies = {c.name: ModelTally(protocol.trajectories) for c in candidates}
    sheet = SheetFrames(sheet_clips)
    keys: list[str] = []
    for index, group in enumerate(batched(clips, protocol.batch_clips)):
        latents, actions = stack_clips(group, protocol.frames)
        truth = decode(latents)
        batch_keys = [c.key for c in group]
        keys += batch_keys
        sheet.add_truth(batch_keys, truth)
        for cand in candidates:
            samples, rollout = rollout_pixels(cand, latents, actions, protocol, decode, index, device)
            tally = tallies[cand.name]
            tally.settings = sampler_settings(cand.cfg, protocol, cand.cfg_scale)
            tally.add(truth, samples, protocol, nets)
            tally.add_timing(rollout)
            sheet.add_samples(cand.name, samples)
        if progress is not None:
            progress(len(keys))
    if not keys:
        raise InputError("no evaluation clips: the held-out data yielded nothing")
    return EvalRun(protocol, keys, tallies, sheet, {c.name: c.source for c in candidates},
                   {c.name: c.history for c in candidates})
