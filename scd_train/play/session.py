"""One play session: the loaded model(s), held-out contexts, the live streams, one frame per tick.

The server's tick and ``scd-play --script`` both call ``PlaySession.tick``; nothing here knows
about the web. Every method runs on one thread at a time (the server's model worker), so the
stream's settings only change between frames.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scd_train.config import Config, ConfigError
from scd_train.diffusion.sampling import SamplerSettings, new_stream, settings_from_config
from scd_train.errors import InputError
from scd_train.play.actions import ActionSet, build_action_set
from scd_train.video import to_hwc_uint8

log = logging.getLogger(__name__)


class PlayLimit(InputError):
    """The run cannot generate another frame: no encoder window and ``model.max_frames`` reached."""


@dataclass
class PlayOptions:
    steps: int | None = None  # decoder steps; None = the run's diffusion.sample_steps
    cfg_scale: float | None = None  # guidance scale; None = the run's diffusion.cfg_scale
    context_frames: int = 4
    context_from: str | None = None  # a held-out clip key or index to start from
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    use_ema: bool = True
    baseline: Path | None = None  # a dense-baseline run played side by side on the same actions


@dataclass
class PanelTiming:
    """Seconds one model spent on a frame: encoder (context pass), decoder steps, latent -> pixels."""

    encoder: float = 0.0
    decoder: float = 0.0
    render: float = 0.0

    def to_dict(self) -> dict:
        return {"encoder_ms": 1000 * self.encoder, "decoder_ms": 1000 * self.decoder,
                "render_ms": 1000 * self.render}


@dataclass
class TickResult:
    index: int  # absolute frame index in the stream, context frames included
    generated: bool  # False for the last context frame shown after a reset
    action: int | None  # the action this frame was generated under (None: the null action)
    images: list[np.ndarray]  # (H, W, 3) uint8, one per panel (the model, then the baseline)
    timings: list[PanelTiming] = field(default_factory=list)
    seconds: float = 0.0  # the whole tick, every panel, decoding included
    clip: str = ""  # the held-out clip the context came from


def load_play_model(source: Path, checkpoint: str | None, use_ema: bool, device: str) -> tuple[nn.Module, Config]:
    """The model of a run directory or exported file, with errors that say what to do."""
    from scd_train.weights import load_model

    if not source.exists():
        raise InputError(f"{source} does not exist: give a run directory (with config.yaml and checkpoints/) "
                         "or an exported .safetensors file")
    if source.is_dir() and not (source / "config.yaml").is_file():
        raise InputError(f"{source} is not a run directory: it has no config.yaml (train one with "
                         f"scd-train ... train.run_dir={source})")
    try:
        return load_model(source, checkpoint, use_ema=use_ema, device=device)
    except FileNotFoundError as exc:
        raise InputError(f"{source} has no weights to play: {exc}; train it first (scd-train ... "
                         f"train.run_dir={source}) or pass an exported .safetensors file") from None
    except (KeyError, ConfigError) as exc:
        raise InputError(f"{source}: {exc}") from None


def plays_endlessly(cfg: Config) -> bool:
    """Whether the model attends to a bounded window of frames (``model.encoder_window``), so a
    stream can run forever at constant memory; without one it stops at ``model.max_frames``."""
    return getattr(cfg.model, "encoder_window", None) is not None


def _stream_capacity(cfg: Config) -> int:
    # the dense baseline keeps one cache slot beyond its committed frames for the frame being denoised
    return cfg.model.max_frames - (1 if cfg.model.arch == "causal_dit" else 0)


class Panel:
    """One model playing: its settings, generator and live stream."""

    def __init__(self, label: str, model: nn.Module, cfg: Config, settings: SamplerSettings, seed: int) -> None:
        self.label, self.model, self.cfg, self.settings = label, model, cfg, settings
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.stream = None

    def open(self, context: torch.Tensor, actions: torch.Tensor | None) -> None:
        try:
            self.stream = new_stream(self.model, self.settings, 1, _stream_capacity(self.cfg), self.generator)
        except ValueError as exc:  # settings the stream refuses (e.g. guidance the model cannot do)
            raise InputError(f"{self.label}: {exc}") from None
        if self.cfg.model.num_actions == 0:
            actions = None  # the clip may carry actions the model was not trained to read
        self.stream.prefill(context.to(self.device), None if actions is None else actions.to(self.device))

    def step(self, action: int | None) -> tuple[torch.Tensor, PanelTiming]:
        tensor = None
        if action is not None:
            tensor = torch.tensor([action], device=self.device, dtype=torch.long)
        elif self.cfg.model.num_actions > 0:
            tensor = torch.tensor([self.cfg.model.num_actions], device=self.device, dtype=torch.long)  # null id
        latent = self.stream.next_frame(tensor)
        timing = self.stream.last_timing
        return latent, PanelTiming(timing.encoder, timing.decoder)

    def close(self) -> None:
        self.stream = None


class PlaySession:
    """The model (and optionally the dense baseline), ready to stream from held-out contexts."""

    def __init__(self, source: Path, options: PlayOptions) -> None:
        self.source, self.options = Path(source), options
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"--device {options.device}: CUDA is not available here; use --device cpu")
        model, self.cfg = load_play_model(self.source, options.checkpoint, options.use_ema, options.device)
        self.actions: ActionSet = build_action_set(self.cfg)
        steps = options.steps if options.steps is not None else self.cfg.diffusion.sample_steps
        self._check_steps(steps, "--steps")
        self.panels = [Panel("SCD" if self.cfg.model.arch == "scd" else "dense", model, self.cfg,
                             self._settings(self.cfg, steps, baseline=False), options.seed)]
        if options.baseline is not None:
            self.panels.append(self._baseline_panel(Path(options.baseline), steps))
        self._load_contexts()
        self.frames_total = 0
        self.next_clip = self._first_clip()
        self.clip_key = ""

    # -- construction -------------------------------------------------------------------------

    def _settings(self, cfg: Config, steps: int, baseline: bool) -> SamplerSettings:
        d = cfg.diffusion
        scale = d.cfg_scale if self.options.cfg_scale is None else self.options.cfg_scale
        # the dense baseline has no encoder context to perturb: its guidance is always over actions
        mode = "action" if baseline else d.cfg_mode
        # from the run's own config, so a distilled student plays on its own step grid
        return settings_from_config(d, steps, scale, mode, compile="off")

    def _baseline_panel(self, path: Path, steps: int) -> Panel:
        model, cfg = load_play_model(path, None, self.options.use_ema, self.options.device)
        m, b = self.cfg.model, cfg.model
        mine, theirs = (m.latent_channels, m.latent_height, m.latent_width), (b.latent_channels, b.latent_height,
                                                                               b.latent_width)
        if mine != theirs:
            raise InputError(f"--baseline {path}: latent frames {theirs} do not match the played run's {mine}; "
                             "the two models must share latents (the same data)")
        if b.num_actions != m.num_actions:
            raise InputError(f"--baseline {path}: model.num_actions={b.num_actions} but the played run has "
                             f"model.num_actions={m.num_actions}; both must take the same actions")
        label = "dense baseline" if b.arch == "causal_dit" else "baseline"
        return Panel(label, model, cfg, self._settings(cfg, steps, baseline=b.arch == "causal_dit"),
                     self.options.seed)

    def _load_contexts(self) -> None:
        from scd_train.data.holdout import holdout_clips

        frames = self.options.context_frames
        if frames < 1 or frames >= self.max_frames:
            raise InputError(f"--context {frames}: needs at least 1 context frame and room for generated ones "
                             f"below model.max_frames={self.max_frames}")
        try:
            self.clips, self.codec = holdout_clips(self.cfg, frames)
        except ValueError as exc:  # ManifestError and too-long synthetic clips are ValueErrors
            raise InputError(f"held-out contexts for --context {frames}: {exc}") from None
        if len(self.clips) == 0:
            raise InputError(f"the run's held-out data has no clip of {frames} frames to start from")
        vae = getattr(self.codec, "vae", None)
        if vae is not None:
            vae.to(self.options.device)

    def _first_clip(self) -> int:
        wanted = self.options.context_from
        if wanted is None:
            return 0
        keys = [self.clips.key(i) for i in range(len(self.clips))]
        if wanted in keys:
            return keys.index(wanted)
        if wanted.isdigit() and int(wanted) < len(keys):
            return int(wanted)
        raise InputError(f"--context-from {wanted!r} is neither a held-out clip key nor an index below {len(keys)}; "
                         f"the held-out clips are {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")

    @staticmethod
    def _check_steps(steps: object, what: str) -> int:
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise InputError(f"{what}={steps!r}: decoder steps must be an integer from 1 to 1000")
        return steps

    # -- state --------------------------------------------------------------------------------

    @property
    def endless(self) -> bool:
        return all(plays_endlessly(p.cfg) for p in self.panels)

    @property
    def max_frames(self) -> int:
        return min(p.cfg.model.max_frames for p in self.panels)

    @property
    def frames_left(self) -> int | None:
        return None if self.endless else self.max_frames - self.frames_total

    @property
    def steps(self) -> int:
        return self.panels[0].settings.steps

    @property
    def is_open(self) -> bool:
        return any(p.stream is not None for p in self.panels)

    @property
    def frame_shape(self) -> tuple[int, int]:
        pixels = self.codec.decode(self.clips.latents[:1, 0])
        return int(pixels.shape[-2]), int(pixels.shape[-1])

    def limit_message(self) -> str:
        return (f"this run has no encoder window, so it plays at most model.max_frames={self.max_frames} frames "
                f"(context included). Press reset for a new context, or train with model.encoder_window=N "
                f"(e.g. N={self.cfg.data.clip_frames}, the training clip length) to play endlessly.")

    def describe(self) -> dict:
        height, width = self.frame_shape
        return {"run": str(self.source), "panels": [p.label for p in self.panels], "steps": self.steps,
                "sample_steps": self.cfg.diffusion.sample_steps, "cfg_scale": self.panels[0].settings.cfg_scale,
                "max_frames": self.max_frames, "endless": self.endless,
                "encoder_window": getattr(self.cfg.model, "encoder_window", None),
                "context_frames": self.options.context_frames, "clips": len(self.clips),
                "height": height, "width": width, "actions": self.actions.to_dict(),
                "limit": None if self.endless else self.limit_message()}

    # -- playing ------------------------------------------------------------------------------

    def set_steps(self, steps: int) -> None:
        self._check_steps(steps, "steps")
        for panel in self.panels:
            panel.settings.steps = steps

    def reset(self, clip: int | None = None) -> TickResult:
        """Start every panel from a new held-out context (the next clip unless ``clip`` is given)."""
        index = self.next_clip if clip is None else clip
        self.next_clip = (index + 1) % len(self.clips)
        batch = self.clips.collate([index])
        self.clip_key = batch.keys[0]
        start = time.perf_counter()
        for panel in self.panels:
            panel.open(batch.latents, batch.actions)
        self.frames_total = batch.latents.shape[1]
        last = batch.latents[:, -1]
        images, timings = [], []
        for _ in self.panels:
            image, seconds = self._render(last)
            images.append(image)
            timings.append(PanelTiming(render=seconds))
        last_action = None if batch.actions is None else int(batch.actions[0, -1])
        return TickResult(self.frames_total - 1, False, last_action, images, timings,
                          time.perf_counter() - start, self.clip_key)

    def tick(self, action: int | None) -> TickResult:
        """Generate the next frame of every panel under ``action`` (None: the null action); after ``reset``."""
        if not self.is_open:
            raise RuntimeError("no stream is open: call reset() to start from a context first")
        if not self.endless and self.frames_total >= self.max_frames:
            raise PlayLimit(self.limit_message())
        if action is not None:
            self.actions.check(action)
        start = time.perf_counter()
        images, timings = [], []
        for panel in self.panels:
            latent, timing = panel.step(action)
            image, timing.render = self._render(latent)
            images.append(image)
            timings.append(timing)
        index = self.frames_total
        self.frames_total += 1
        return TickResult(index, True, action, images, timings, time.perf_counter() - start, self.clip_key)

    def _render(self, latent: torch.Tensor) -> tuple[np.ndarray, float]:
        """(H, W, 3) uint8 pixels of one latent frame (1, C, h, w), and the seconds it took."""
        start = time.perf_counter()
        with torch.no_grad():
            pixels = self.codec.decode(latent.float())
        image = to_hwc_uint8(pixels.reshape(-1, *pixels.shape[-3:]).cpu())[0]
        return image, time.perf_counter() - start

    def warm_up(self) -> None:
        """Play one frame and close again: checks the context and settings and runs the model once
        (allocator, kernel choice) before a player waits on it. The next reset starts where it would have."""
        first = self.next_clip
        self.reset()
        self.tick(self.actions.idle)
        self.close()
        self.next_clip = first

    def close(self) -> None:
        """Drop the live streams and their caches (a player left)."""
        for panel in self.panels:
            panel.close()
        if torch.cuda.is_available() and self.options.device.startswith("cuda"):
            torch.cuda.empty_cache()
