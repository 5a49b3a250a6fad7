"""Typed run configuration: dataclass defaults <- YAML file <- dotted CLI overrides.

Every field is declared (and documented) once, here. Loading walks the merged mapping against the
dataclasses, so an unknown key fails with the nearest valid key and a wrong type fails with the
dotted path, the value and the expected type. Cross-field rules live in ``validate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf

from scd_train.errors import InputError


class ConfigError(InputError):
    """A configuration value or key is invalid; the message names the dotted path."""


@dataclass
class ModelConfig:
    # "scd": causal encoder + frame-wise decoder; "causal_dit": the dense frame-causal baseline.
    arch: Literal["scd", "causal_dit"] = "scd"
    # Latent frames are (channels, height, width); tokens per frame = (height/patch) * (width/patch).
    latent_channels: int = 32
    latent_height: int = 8
    latent_width: int = 8
    patch_size: int = 1
    width: int = 1024
    num_heads: int = 16
    head_dim: int = 64
    encoder_layers: int = 8
    decoder_layers: int = 4
    # Depth of the dense baseline (arch=causal_dit); 12 matches SCD-M's 8 + 4.
    layers: int = 12
    mlp_ratio: float = 4.0
    # Number of action classes; the null id equals this number. 0 disables action conditioning.
    num_actions: int = 4
    # Per-frame probability of replacing an action with the null id during training.
    action_dropout: float = 0.1
    # Largest frame index the model is validated for (positional range of training + rollouts).
    max_frames: int = 300
    # Head-dim split of the 3-axis RoPE over (frame, row, column); must sum to head_dim.
    rope_axes: list[int] = field(default_factory=lambda: [16, 24, 24])
    rope_theta: float = 10000.0
    # Std of the Gaussian perturbation of the encoder's normalized output in training.
    context_noise: float = 0.05
    # The history a model reads in training, for SCD and the dense baseline alike, so that two runs
    # of one config differing only in model.arch compare like with like:
    # "noisy" (the official release, and diffusion forcing for the dense model): the same
    #   per-frame-noised sequence the targets come from; SCD's encoder reads it at the clean label
    #   (t = -1), the dense model at each frame's own timestep.
    # "clean" (teacher forcing): ground-truth history; SCD's encoder reads the clean latents, the
    #   dense model attends from each noisy frame t to a clean copy of frames < t.
    # Sampling always conditions both on clean frames (given context, then generated frames).
    encoder_input: Literal["clean", "noisy"] = "noisy"
    # How the decoder fuses the encoder tokens of frame t-1 with the noisy tokens of frame t:
    # "token_concat" (the release: 2N tokens, shared RoPE ids), "token_concat_with_proj" (the same
    # after a LayerNorm + zero-initialised Linear on the encoder tokens, the release's ablation),
    # "add" (N tokens, summed) or "channel_concat" (N tokens, [ctx | noisy] projected, starts as a sum).
    fusion: Literal["token_concat", "token_concat_with_proj", "add", "channel_concat"] = "token_concat"
    # "auto": FlexAttention block masks on CUDA, SDPA with a boolean mask elsewhere.
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    # Release compatibility, for matching its numbers (configs/scd_m_release.yaml); off = fp32.
    # RoPE positions held in bf16, as the release builds them in the latents' dtype: frame ids
    # above 256 round to even numbers, above 512 to multiples of 4 (rows and columns are exact).
    reference_bf16_rope: bool = False
    # Timesteps rounded to bf16 before the sinusoidal embedding (t in [512, 1000] in steps of 4),
    # in training and sampling; noise levels themselves are unaffected.
    reference_bf16_timesteps: bool = False
    # Frames of history every encoder token attends to: its own frame and the previous
    # encoder_window - 1 (the training mask and a fixed-size ring-buffer KV cache at inference
    # alike); null = the full history. With a window, streams run past max_frames at constant
    # memory and per-frame cost (docs/streaming.md). Applies to the dense baseline too.
    encoder_window: int | None = None
    # The first frames of a clip or stream, kept in view beside the window for ever (0 = none).
    encoder_sink_frames: int = 0


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    # Logit-normal timestep density: u = sigmoid(N(mean, std)) per frame.
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # Probability that a history frame (index >= 1) stays clean; frame 0 is always clean.
    clean_context_ratio: float = 0.1
    # Number of trailing frames that are decoder targets; null means all frames but the first.
    target_window: int | None = None
    # Decoder noise draws per encoder pass (the encoder gets gradient from all of them).
    decoder_multi_batch: int = 2
    # Reproduce the official release's bf16 latents: they are cast before noise is drawn, so noise,
    # noisy inputs and velocity targets are bf16 (off: fp32 throughout).
    reference_bf16_inputs: bool = False
    # Reproduce the release's action bug: the first decoder pass of each step conditions target
    # frame t on action t+1 (the copy it shifted for the encoder); the other passes use action t,
    # as sampling does. SCD only (the dense baseline's draws are one pass).
    reference_first_pass_next_action: bool = False
    # Sampling defaults (scd-sample and evaluation can override them).
    sample_steps: int = 50
    # Euler noise levels: "release" (linear from 1 down to 1/T, then a last step to 0, as the
    # official sampler) or "uniform" (sample_steps equal intervals from 1 to 0; few-step students
    # from scd-distill are trained on it, so none of their steps is spent on the interval 1/T -> 0).
    sample_schedule: Literal["release", "uniform"] = "release"
    cfg_scale: float = 1.0
    # "decoder": unconditional branch = encoder context with fresh noise; "action": null actions.
    cfg_mode: Literal["decoder", "action"] = "decoder"
    # Guidance scales scd-eval evaluates this model at when --cfg-scale is not given, one result per
    # scale (the release evaluates at 1.5 and 1.0); null: [cfg_scale].
    eval_cfg_scales: list[float] | None = None
    # The sampler's per-frame decoder loop: "auto" compiles it on CUDA (torch.compile, plus a
    # CUDA graph of a whole frame's steps where that is faster) and runs it eagerly elsewhere;
    # "on" compiles on any device (a CPU pays a minute of compilation up front); "off" is eager.
    sample_compile: Literal["auto", "on", "off"] = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    encoder_lr_ratio: float = 1.0
    decoder_lr_ratio: float = 2.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Linear warmup length in optimizer steps, then constant.
    warmup_steps: int = 10000
    # Count warmup from 0 as the release's scheduler does: lr 0 at the first step and the full rate
    # from step warmup_steps on (off: step s trains at (s+1)/warmup_steps, no step at lr 0).
    reference_warmup_from_zero: bool = False
    # Global gradient-norm clip; 0 disables clipping.
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    # Freeze the encoder (lr 0 for its groups) from this step on; null keeps training it.
    freeze_encoder_after: int | None = None


@dataclass
class SyntheticDataConfig:
    """The embedded "moving digits" videos (scikit-learn's bundled 8x8 digits)."""

    num_videos: int = 256
    frames_per_video: int = 32
    image_size: int = 32
    # Upscale factor applied to the 8x8 digits.
    digit_scale: int = 2
    digits_per_video: int = 1
    # Probability that the action changes from one frame to the next.
    action_change_prob: float = 0.2
    # Pixels moved per frame.
    speed: int = 2
    # Space-to-depth factor of the lossless codec that turns frames into latents.
    codec_factor: int = 4
    # Fraction of videos held out for evaluation and sampling.
    holdout_fraction: float = 0.125


@dataclass
class DataConfig:
    # "synthetic" renders the embedded videos in memory; the others read latent shards.
    source: Literal["synthetic", "webdataset", "mds"] = "synthetic"
    # Directory holding shards and manifest.json (for webdataset / mds): a local path or an
    # s3://bucket/prefix URL (endpoint and credentials from the standard AWS_* variables / profiles).
    path: str | None = None
    # Shard directory of held-out clips for sampling and evaluation (webdataset / mds).
    holdout_path: str | None = None
    # Node-local directory caching MDS shards read from a bucket (null: <tmp>/scd-train-cache-<uid>);
    # one job at a time per node and set. Leftovers of a killed run are cleaned at start-up.
    cache_dir: str | None = None
    # Most bytes the cache may hold per shard set, e.g. "20gb" (null: the whole set); at least 4 shards.
    cache_limit: str | None = None
    # Tries of each bucket request on transient failures (connection, timeout, throttling, 5xx),
    # waiting remote_retry_delay_s, then twice as long each time (at most 8 s); every retry is logged.
    remote_retries: int = 5
    remote_retry_delay_s: float = 0.5
    # Latent normalization the model expects; must match the manifest ("channel_stats": per-channel
    # mean/std measured at encode time, "scaling_factor": the VAE's scaling/shift factors).
    normalization: Literal["channel_stats", "scaling_factor"] = "channel_stats"
    # VAE folder that decodes latents to pixels; null uses the one recorded in the manifest.
    # When set, its config and weights hashes must match the manifest's.
    vae_path: str | None = None
    # A manifest that does not identify its VAE (config and weights sha256, temporal compression)
    # is refused unless this is true; the run then cannot check which VAE made its latents.
    allow_unverified_vae: bool = False
    # Frames per training clip.
    clip_frames: int = 16
    # Stride between clip starts when cutting videos into clips.
    clip_stride: int = 8
    # When set, each step trains on the first L frames of its clips, L drawn uniformly from
    # [random_clip_min_frames, clip_frames] by a (seed, step) generator shared by all ranks.
    random_clip_min_frames: int | None = None
    # Clips per rank per micro-batch.
    batch_size: int = 8
    num_workers: int = 0
    # Data-order seed; the shuffle is a pure function of (seed, epoch).
    seed: int = 0
    # Corrupt samples: "error" stops with shard and member named, "skip" counts and caps them.
    on_corrupt: Literal["error", "skip"] = "error"
    max_corrupt_skips: int = 16
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    # "auto": bf16 autocast on CUDA, fp32 elsewhere.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["single", "ddp", "fsdp2", "deepspeed"] = "single"
    # Micro-batches accumulated per optimizer step.
    grad_accum: int = 1
    # Recompute each transformer block in backward to save activation memory.
    activation_checkpointing: bool = False
    run_dir: str = "runs/default"
    # Resume from the newest intact checkpoint in run_dir when one exists.
    resume: bool = True
    # resume=false in a run_dir that already holds a run (checkpoints or metrics): "refuse" the start,
    # "archive" the old run under run_dir/archive/<time>/ first, or "overwrite" (delete) it.
    on_used_run_dir: Literal["refuse", "archive", "overwrite"] = "refuse"
    # Seconds to wait for another process holding run_dir (e.g. a previous job still saving) to end.
    run_dir_lock_wait_s: float = 120.0
    # Seconds a stop request (SIGTERM/SIGUSR2, a vanished launcher) waits for the next step boundary
    # before the process exits without saving; checkpoint writes do not count. 0 waits forever.
    stop_grace_s: float = 120.0
    # Seconds every rank waits for the others to join the process group before it stops, naming
    # the missing ranks (not used under torchrun, whose agent gathers the workers itself).
    rendezvous_timeout_s: float = 300.0
    # Seconds a collective (all-reduce, barrier, a checkpoint's gather) may wait for a peer.
    collective_timeout_s: float = 1800.0
    # safetensors weights (e.g. from scd-convert) loaded into the model before training starts;
    # ignored once run_dir holds a checkpoint to resume from.
    init_from: str | None = None
    checkpoint_every: int = 500
    # Complete checkpoints kept; the newest complete one is never deleted.
    keep_checkpoints: int = 2
    # Non-finite loss or gradient norm: "stop" the run, or "skip" the step (bounded).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 0
    # backend=deepspeed: a DeepSpeed JSON merged over the one generated from this config (ZeRO
    # stage 3 only; it may not carry "optimizer" or "scheduler", which would override our groups).
    deepspeed_config: str | None = None


@dataclass
class LogConfig:
    every: int = 10
    progress_bar: bool = True
    # wandb: "offline" writes under run_dir/wandb for a later `wandb sync`.
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "scd-train"
    wandb_name: str | None = None
    # Peak dense TFLOP/s of one device for MFU; null detects known GPUs (none on CPU).
    peak_tflops: float | None = None


@dataclass
class Fp8Config:
    """FP8 matmuls for chosen transformer blocks (``precision.fp8``); see scd_train/precision."""

    enabled: bool = False
    # "te": Transformer Engine linears under TE's FP8 autocast (CUDA only);
    # "torchao": torchao.float8 Float8Linear (CUDA, or CPU emulation with cpu_emulation=true).
    backend: Literal["te", "torchao"] = "te"
    # Whose per-token linears (qkv, attention out, MLP) run in FP8: "encoder" (where FP8 pays),
    # "decoder", "all", or glob patterns over linear names (e.g. "encoder.blocks.1?.mlp.*").
    # Embeddings, per-frame modulation and output projections always stay in high precision.
    modules: list[str] = field(default_factory=lambda: ["encoder"])
    # Glob patterns of otherwise selected linears to keep in high precision.
    exclude: list[str] = field(default_factory=list)
    # "delayed": scales from an amax history (te); "current": per-tensor scales from the tensor
    # itself (te Float8CurrentScaling, torchao tensorwise); "rowwise": per-row scales (torchao);
    # "mxfp8": 32-element blocks with power-of-two scales (te, compute capability >= 10.0).
    recipe: Literal["delayed", "current", "rowwise", "mxfp8"] = "current"
    # "hybrid": e4m3 forward, e5m2 gradients; "e4m3" everywhere (te recipes and torchao current).
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    # Delayed scaling only: amax history length, how the amax is chosen from it, scale margin
    # (power-of-two headroom), and whether amaxes are all-reduced over the data-parallel ranks.
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = 0
    reduce_amax: bool = True
    # torchao under train.backend=fsdp2: all-gather weights in FP8 (half the all-gather bytes).
    fsdp_float8_all_gather: bool = False
    # torchao on a CPU device: run torchao's float8 emulation (numerics checks and tests only;
    # slower than fp32). Without it, FP8 on CPU is refused.
    cpu_emulation: bool = False


@dataclass
class PrecisionConfig:
    fp8: Fp8Config = field(default_factory=Fp8Config)


@dataclass
class DistillConfig:
    """Few-step distillation of a trained run (``scd-distill``); an ordinary training run leaves
    ``teacher`` null. The student is sampled with ``diffusion.sample_steps`` Euler steps."""

    # "trajectory": each of the student's Euler steps regresses the teacher's ODE solution over the
    # same noise interval (integrated with teacher_steps / sample_steps teacher Euler steps).
    method: Literal["trajectory"] = "trajectory"
    # The teacher: a run directory or an EMA export (.safetensors); its EMA weights are used.
    teacher: str | None = None
    # The teacher checkpoint the weights were read from (resolved and recorded at start).
    teacher_checkpoint: str | None = None
    # The teacher's Euler steps over the whole noise range; null: its diffusion.sample_steps.
    teacher_steps: int | None = None
    # Guidance of the teacher's velocity (the student learns the guided flow and samples without
    # guidance); null: the teacher run's diffusion.cfg_scale / cfg_mode.
    teacher_cfg_scale: float | None = None
    teacher_cfg_mode: Literal["decoder", "action"] | None = None
    # Train on the student's own rollouts: the encoder reads frames the student generated after the
    # first rollout_context_frames of each clip, and each step starts from the student's own state.
    self_rollout: bool = False
    rollout_context_frames: int = 2
    # Train the student's encoder too (it starts from the teacher's, which keeps a frozen copy);
    # by default the encoder is the teacher's, frozen and shared.
    train_encoder: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides; validated.

    An error names where the offending value came from: the file, or the command-line override.
    """
    text = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
    return config_from_text(text, overrides, source=str(path) if path is not None else None)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``1e-3`` (no dot) is a string; YAML 1.2 and every user read it
    as a number."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str, where: str) -> Any:
    """YAML with 1.2 number rules; a syntax error names ``where`` and the line."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}:{line} invalid YAML ({problem})") from None


def config_from_text(text: str | None, overrides: list[str] | None = None, source: str | None = None) -> Config:
    """Like ``load_config`` for YAML held in a string (e.g. metadata of an exported model);
    ``source`` names the text in messages."""
    where = source or "config"
    merged = OmegaConf.create({})
    if text:
        loaded = parse_yaml(text, where)
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ConfigError(f"{where}: expected a mapping of sections (model:, optim:, ...), got {loaded!r}")
            merged = OmegaConf.create(loaded)
            _check_part(merged, where)
    for override in overrides or []:
        merged = _apply_override(merged, override)
    try:
        raw = OmegaConf.to_container(merged, resolve=True) or {}
    except Exception as exc:  # omegaconf interpolation errors (${...}) come in many types
        origin = f"{where} with the command-line overrides" if overrides else where
        raise ConfigError(f"{origin}: cannot resolve an interpolation ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]})") from None
    cfg = from_dict(Config, raw, prefix="")
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(_attribute(str(exc), where, overrides or [])) from None
    return cfg


def _check_part(part, where: str) -> None:
    """Keys and types of one source (the file or one override) on their own, so errors name it.

    A part whose ${...} interpolations need the other parts is left to the check of the merged config.
    """
    try:
        raw = OmegaConf.to_container(part, resolve=True)
    except Exception:  # noqa: BLE001 - unresolvable on its own
        return
    try:
        from_dict(Config, raw, prefix="")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _apply_override(merged, override: str):
    if "=" not in override:
        raise ConfigError(f"command-line override {override!r} is not of the form key.sub=value")
    where = f"command-line override {override!r}"
    try:
        part = OmegaConf.from_dotlist([override])
    except Exception as exc:  # omegaconf's grammar errors
        raise ConfigError(f"{where}: cannot parse the value ({str(exc).splitlines()[0]})") from None
    _check_part(part, where)
    try:
        return OmegaConf.merge(merged, part)
    except Exception as exc:
        raise ConfigError(f"{where}: {str(exc).splitlines()[0]}") from None


_DOTTED_KEY = re.compile(r"\b[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+")


def _attribute(message: str, where: str, overrides: list[str]) -> str:
    """Prefix a cross-field error with the file, or name the overrides that set the keys it cites."""
    cited = set(_DOTTED_KEY.findall(message))
    last = {o.split("=", 1)[0].strip(): o for o in overrides}  # the last override of a key is the one in effect
    involved = [o for key, o in last.items() if key in cited]
    if involved:
        return f"{message} (set on the command line: {' '.join(involved)})"
    return f"{where}: {message}"


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            path = f"{prefix}{key}"
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{path}'{hint} (valid keys here: {valid})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**values)


_FLOAT_TEXT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{path}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}={value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: expected a list")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)  # e.g. 1e-3 from a YAML 1.1 reader or a quoted sweep value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp}")


# Lower bounds of single values: (dotted key, smallest allowed value, what the bound protects).
_AT_LEAST = (
    ("model.latent_channels", 1), ("model.latent_height", 1), ("model.latent_width", 1), ("model.patch_size", 1),
    ("model.width", 1), ("model.num_heads", 1), ("model.head_dim", 2), ("model.max_frames", 2),
    ("diffusion.num_train_timesteps", 1), ("diffusion.sample_steps", 1), ("diffusion.cfg_scale", 0.0),
    ("model.context_noise", 0.0), ("optim.weight_decay", 0.0), ("optim.grad_clip", 0.0),
    ("data.clip_stride", 1), ("data.batch_size", 1), ("data.num_workers", 0), ("data.max_corrupt_skips", 0),
    ("train.steps", 1), ("train.checkpoint_every", 0), ("train.max_nonfinite_skips", 0), ("log.every", 0),
    ("data.synthetic.num_videos", 2), ("data.synthetic.frames_per_video", 2), ("data.synthetic.image_size", 1),
    ("data.synthetic.digit_scale", 1), ("data.synthetic.digits_per_video", 1), ("data.synthetic.speed", 0),
    ("data.synthetic.codec_factor", 1),
)
# Values that must be strictly positive.
_POSITIVE = ("model.mlp_ratio", "model.rope_theta", "optim.lr", "optim.eps", "diffusion.logit_std")
# Values in the closed interval [0, 1].
_UNIT = ("optim.ema_decay", "data.synthetic.action_change_prob")


def _value(cfg: Config, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _validate_ranges(cfg: Config) -> None:
    for key, low in _AT_LEAST:
        value = _value(cfg, key)
        _require(value >= low, f"{key}={value!r} must be >= {low}")
    for key in _POSITIVE:
        value = _value(cfg, key)
        _require(value > 0, f"{key}={value!r} must be > 0")
    for key in _UNIT:
        value = _value(cfg, key)
        _require(0.0 <= value <= 1.0, f"{key}={value!r} must be in [0, 1]")
    o = cfg.optim
    _require(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas={o.betas} entries must be in [0, 1)")
    for key in ("optim.encoder_lr_ratio", "optim.decoder_lr_ratio"):
        value = _value(cfg, key)
        _require(value >= 0, f"{key}={value!r} must be >= 0 (0 freezes the module)")
    if o.freeze_encoder_after is not None:
        _require(o.freeze_encoder_after >= 0,
                 f"optim.freeze_encoder_after={o.freeze_encoder_after} must be >= 0 or null")
    if cfg.log.peak_tflops is not None:
        _require(cfg.log.peak_tflops > 0, f"log.peak_tflops={cfg.log.peak_tflops} must be > 0 or null")
    syn = cfg.data.synthetic
    _require(0.0 <= syn.holdout_fraction < 1.0,
             f"data.synthetic.holdout_fraction={syn.holdout_fraction} must be in [0, 1)")


def _validate_architecture(cfg: Config) -> None:
    """A model with no blocks where it needs them trains nothing useful; refuse it."""
    m, d = cfg.model, cfg.diffusion
    if m.arch == "scd":
        _require(m.encoder_layers >= 1, f"model.encoder_layers={m.encoder_layers} must be >= 1: the SCD encoder "
                                        "is what carries the history (for a model without one, use arch causal_dit)")
        _require(m.decoder_layers >= 1, f"model.decoder_layers={m.decoder_layers} must be >= 1: the decoder "
                                        "renders every frame")
    else:
        _require(m.layers >= 1, f"model.layers={m.layers} must be >= 1 for model.arch='causal_dit'")
        _require(d.cfg_scale == 1.0 or d.cfg_mode == "action",
                 f"diffusion.cfg_mode='decoder' with diffusion.cfg_scale={d.cfg_scale}: the dense baseline has no "
                 "encoder context to perturb; set diffusion.cfg_mode=action (or cfg_scale=1.0)")


def ignored_settings(cfg: Config) -> list[str]:
    """Settings that differ from their defaults but have no effect on this run, as messages."""
    notes = []
    if cfg.model.arch == "causal_dit":
        defaults = OptimConfig()
        for key in ("encoder_lr_ratio", "decoder_lr_ratio", "freeze_encoder_after"):
            value = getattr(cfg.optim, key)
            if value != getattr(defaults, key):
                notes.append(f"optim.{key}={value!r} has no effect on model.arch='causal_dit': the dense baseline "
                             "has one parameter group ('model') trained at optim.lr")
    return notes


def validate(cfg: Config) -> None:
    """Cross-field rules, each with a message that says what to change."""
    m, d, o, t = cfg.model, cfg.diffusion, cfg.optim, cfg.train
    _validate_ranges(cfg)
    _validate_architecture(cfg)
    _require(m.width == m.num_heads * m.head_dim,
             f"model.width={m.width} must equal model.num_heads*model.head_dim "
             f"({m.num_heads}*{m.head_dim}={m.num_heads * m.head_dim})")
    _require(sum(m.rope_axes) == m.head_dim and len(m.rope_axes) == 3,
             f"model.rope_axes={m.rope_axes} must be 3 entries summing to model.head_dim={m.head_dim}")
    _require(all(a % 2 == 0 for a in m.rope_axes), f"model.rope_axes={m.rope_axes} entries must be even")
    for name in ("latent_height", "latent_width"):
        size = getattr(m, name)
        _require(size % m.patch_size == 0,
                 f"model.{name}={size} is not divisible by model.patch_size={m.patch_size}")
    _require(m.num_actions >= 0, f"model.num_actions={m.num_actions} must be >= 0")
    _require(0.0 <= m.action_dropout < 1.0, f"model.action_dropout={m.action_dropout} must be in [0, 1)")
    _require(d.decoder_multi_batch >= 1, f"diffusion.decoder_multi_batch={d.decoder_multi_batch} must be >= 1")
    _require(0.0 <= d.clean_context_ratio < 1.0,
             f"diffusion.clean_context_ratio={d.clean_context_ratio} must be in [0, 1)")
    _require(cfg.data.clip_frames >= 2, f"data.clip_frames={cfg.data.clip_frames} must be >= 2 (context + target)")
    _require(cfg.data.clip_frames <= m.max_frames,
             f"data.clip_frames={cfg.data.clip_frames} exceeds model.max_frames={m.max_frames}")
    if cfg.data.random_clip_min_frames is not None:
        _require(2 <= cfg.data.random_clip_min_frames <= cfg.data.clip_frames,
                 f"data.random_clip_min_frames={cfg.data.random_clip_min_frames} must be in "
                 f"[2, data.clip_frames={cfg.data.clip_frames}]")
    if d.eval_cfg_scales is not None:
        _require(len(d.eval_cfg_scales) > 0 and len(set(d.eval_cfg_scales)) == len(d.eval_cfg_scales),
                 f"diffusion.eval_cfg_scales={d.eval_cfg_scales} must be null or distinct scales")
    if d.target_window is not None:
        _require(d.target_window >= 1,
                 f"diffusion.target_window={d.target_window} must be >= 1 or null")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _require(len(o.betas) == 2, f"optim.betas={o.betas} must have two entries")
    _require(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
    _require(cfg.data.batch_size >= 1, f"data.batch_size={cfg.data.batch_size} must be >= 1 (clips per rank and "
                                       "micro-batch)")
    _require(cfg.data.num_workers >= 0, f"data.num_workers={cfg.data.num_workers} must be >= 0")
    _require(t.steps >= 0, f"train.steps={t.steps} must be >= 0")
    for name in ("run_dir_lock_wait_s", "stop_grace_s"):
        _require(getattr(t, name) >= 0, f"train.{name}={getattr(t, name)} must be >= 0")
    for name in ("rendezvous_timeout_s", "collective_timeout_s"):
        _require(getattr(t, name) > 0, f"train.{name}={getattr(t, name)} must be > 0 (seconds)")
    _require(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1")
    if cfg.data.source != "synthetic":
        _require(cfg.data.path is not None, f"data.source={cfg.data.source!r} needs data.path (the shard directory)")
    _validate_storage(cfg)
    if cfg.data.source == "synthetic":
        _validate_synthetic(cfg)
    _validate_window(m)
    _validate_fp8(cfg)
    _validate_distill(cfg)


def _validate_storage(cfg: Config) -> None:
    from scd_train.storage import parse_size
    from scd_train.storage.location import check_url

    d = cfg.data
    for key in ("path", "holdout_path"):
        if getattr(d, key) is not None:
            try:
                check_url(getattr(d, key))
            except ValueError as exc:
                raise ConfigError(f"data.{key}: {exc}") from None
    try:
        parse_size(d.cache_limit)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _require(d.remote_retries >= 1, f"data.remote_retries={d.remote_retries} must be >= 1")
    _require(d.remote_retry_delay_s >= 0, f"data.remote_retry_delay_s={d.remote_retry_delay_s} must be >= 0")


def _validate_synthetic(cfg: Config) -> None:
    syn = cfg.data.synthetic
    _require(syn.image_size % syn.codec_factor == 0,
             f"data.synthetic.image_size={syn.image_size} is not divisible by "
             f"data.synthetic.codec_factor={syn.codec_factor}")
    _require(8 * syn.digit_scale <= syn.image_size,
             f"data.synthetic.digit_scale={syn.digit_scale} makes {8 * syn.digit_scale}px digits, larger than "
             f"data.synthetic.image_size={syn.image_size}")
    _require(syn.frames_per_video >= cfg.data.clip_frames,
             f"data.synthetic.frames_per_video={syn.frames_per_video} is shorter than "
             f"data.clip_frames={cfg.data.clip_frames}")


def _validate_window(m: ModelConfig) -> None:
    w, s = m.encoder_window, m.encoder_sink_frames
    _require(s >= 0, f"model.encoder_sink_frames={s} must be >= 0")
    if w is None:
        _require(s == 0, f"model.encoder_sink_frames={s} needs model.encoder_window (sink frames are kept "
                         "beside a window; without one the encoder already sees the whole history)")
        return
    _require(w >= 1, f"model.encoder_window={w} must be >= 1 frame or null (the full history)")
    _require(not (m.arch == "causal_dit" and m.encoder_input == "clean"),
             f"model.encoder_window={w} with model.arch=causal_dit and model.encoder_input=clean: the dense "
             "baseline's teacher forcing (a clean copy of the history beside the noisy frames) has no windowed "
             "mask; use model.encoder_input=noisy for a windowed dense baseline")
    _require(w <= m.max_frames, f"model.encoder_window={w} is larger than model.max_frames={m.max_frames}; "
                                "use a window of at most max_frames frames, or null for the full history")
    _require(s <= w, f"model.encoder_sink_frames={s} is larger than model.encoder_window={w}; "
                     "sinks are a few leading frames kept beside the window")
    _require(w + s <= m.max_frames,
             f"model.encoder_window={w} + model.encoder_sink_frames={s} = {w + s} exceeds model.max_frames="
             f"{m.max_frames}: the frame positions a windowed stream uses (0..{w + s - 1}) must lie inside "
             "the positional range")
    from scd_train.models.attention import window_backend_problem

    problem = window_backend_problem(m.attention, w, s)
    _require(problem is None, problem or "")


_FP8_RECIPES = {"te": ("delayed", "current", "mxfp8"), "torchao": ("current", "rowwise")}


def _validate_fp8(cfg: Config) -> None:
    """Settings-only FP8 rules; hardware and GEMM shapes are checked before the first step."""
    f = cfg.precision.fp8
    if not f.enabled:
        return
    allowed = _FP8_RECIPES[f.backend]
    _require(f.recipe in allowed,
             f"precision.fp8.recipe={f.recipe!r} is not available with precision.fp8.backend={f.backend!r}; "
             f"choose one of {', '.join(allowed)}"
             + (" or backend 'te'" if f.backend == "torchao" else " or backend 'torchao'"))
    _require(len(f.modules) > 0, "precision.fp8.modules is empty; use [encoder], [all] or glob patterns")
    _require(f.amax_history_len >= 1, f"precision.fp8.amax_history_len={f.amax_history_len} must be >= 1")
    _require(f.margin >= 0, f"precision.fp8.margin={f.margin} must be >= 0")
    if f.fsdp_float8_all_gather:
        _require(f.backend == "torchao" and f.recipe == "current" and cfg.train.backend == "fsdp2",
                 "precision.fp8.fsdp_float8_all_gather needs precision.fp8.backend=torchao, recipe=current "
                 f"and train.backend=fsdp2 (got {f.backend}, {f.recipe}, {cfg.train.backend})")
    _require(not (f.cpu_emulation and f.backend == "te"),
             "precision.fp8.cpu_emulation is a torchao feature; Transformer Engine has no CPU path "
             "(set precision.fp8.backend=torchao)")


def _validate_distill(cfg: Config) -> None:
    d, k = cfg.distill, cfg.diffusion.sample_steps
    _require(k >= 1, f"diffusion.sample_steps={k} must be >= 1")
    if d.teacher is None:
        return
    if d.teacher_steps is not None:
        _require(k <= d.teacher_steps,
                 f"diffusion.sample_steps={k} (the student's steps) exceeds distill.teacher_steps={d.teacher_steps}; "
                 "a student takes fewer steps than its teacher")
    if d.self_rollout:
        _require(1 <= d.rollout_context_frames < cfg.data.clip_frames,
                 f"distill.rollout_context_frames={d.rollout_context_frames} must be in [1, data.clip_frames-1="
                 f"{cfg.data.clip_frames - 1}] (ground-truth frames before the student's own)")
        low = cfg.data.random_clip_min_frames
        _require(low is None or d.rollout_context_frames < low,
                 f"distill.rollout_context_frames={d.rollout_context_frames} leaves no generated frame in clips "
                 f"of data.random_clip_min_frames={low}")
    _require(not cfg.precision.fp8.enabled, "precision.fp8.enabled=true is not supported by distillation yet")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; re-loading the file gives the same Config."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    Path(path).write_text(text)
