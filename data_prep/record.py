"""``scd-data record``: play a game world and write one video per episode with its actions.

    scd-data record --env ALE/Breakout-v5 --episodes 64 --frames 200 --size 64 --out data/breakout

writes ``out/train/episode-NNNNNN.mp4`` (+ ``.actions.npy``, + ``.json``), the same for
``out/holdout``, and ``out/record.json``. Frame 0 of an episode is the reset frame; for t >= 1 the
policy sees frame t-1, picks action a_t, and the world's answer is frame t, so ``actions[t]`` is the
action that produced frame t (what ``encode`` and training expect). No action leads to frame 0 or
to a frame after a reset; those get the no-op id 0.

Every episode is a pure function of (world settings, seed, split, index): its env seed comes from
``scd_train.envs.seeds`` (training even, held-out odd) and its policy draws from its own stream, so
the output does not depend on ``--workers`` or on interruptions. Files of an episode are written
actions, then metadata, then the video, each to a temporary name renamed when complete: a video
on disk means its episode is complete. A rerun deletes temporaries, keeps complete episodes and
records the rest; ``record.json`` says ``complete: true`` only once every episode is on disk.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.inputs import ACTIONS_SUFFIX
from data_prep.writers import atomic_save_npy, atomic_write_json
from scd_train.envs import (
    NOOP_ACTION,
    RESIZE_MODES,
    EnvError,
    GameEnv,
    episode_seed,
    make_env,
    make_policy,
    parse_policy,
    policy_rng,
    resize_frame,
)
from scd_train.envs.seeds import SPLITS
from scd_train.errors import InputError
from scd_train.video import write_mp4

RECORD_FILE = "record.json"
RECORD_FORMAT = 1
VIDEO_CODEC = "h264-rgb-lossless"


class RecordError(InputError):
    """Settings or a policy that cannot record; the message names the value."""


@dataclass
class RecordOptions:
    env: str
    out: Path
    episodes: int = 16
    frames: int = 200
    size: int = 64
    policy: str = "sticky"
    seed: int = 0
    # held-out episodes (their own seeds); None: one per eight training episodes, at least one
    holdout_episodes: int | None = None
    workers: int = 1
    frameskip: int | None = None
    sticky_actions: float = 0.0
    # None: the world's own rule (Atari stretch, crafter crop)
    resize: str | None = None
    reset_on_end: bool = False
    fps: int = 15
    overwrite: bool = False
    progress: bool = True

    @property
    def holdout_count(self) -> int:
        return max(1, self.episodes // 8) if self.holdout_episodes is None else self.holdout_episodes


@dataclass(frozen=True)
class EpisodeJob:
    split: str
    index: int
    env_seed: int

    @property
    def name(self) -> str:
        return f"episode-{self.index:06d}"


@dataclass
class RecordSummary:
    recorded: int = 0
    kept: int = 0
    frames: int = 0
    short: int = 0
    seconds: float = 0.0
    episodes: dict[str, list[dict]] = field(default_factory=dict)
    record_file: Path | None = None


# -- settings ----------------------------------------------------------------------------------

def _open_env(opts: RecordOptions) -> GameEnv:
    return make_env(opts.env, opts.frameskip, opts.sticky_actions)


def recording_settings(opts: RecordOptions, env: GameEnv) -> dict:
    """Everything that decides the recorded bytes; a rerun into the same folder must match it."""
    resize = opts.resize or env.default_resize
    return {"world": env.settings(), "size": opts.size, "resize": resize, "frames": opts.frames,
            "policy": parse_policy(opts.policy).to_dict(), "seed": opts.seed, "reset_on_end": opts.reset_on_end,
            "fps": opts.fps, "codec": VIDEO_CODEC}


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _validate(opts: RecordOptions) -> None:
    checks = [(opts.episodes >= 1, f"--episodes {opts.episodes} must be >= 1"),
              (opts.holdout_count >= 0, f"--holdout-episodes {opts.holdout_count} must be >= 0"),
              (opts.frames >= 2, f"--frames {opts.frames} must be >= 2 (a reset frame and one step)"),
              (opts.size >= 8, f"--size {opts.size} must be >= 8 pixels"),
              (opts.workers >= 1, f"--workers {opts.workers} must be >= 1"),
              (opts.fps >= 1, f"--fps {opts.fps} must be >= 1"),
              (opts.resize is None or opts.resize in RESIZE_MODES,
               f"--resize {opts.resize!r}: expected one of {', '.join(RESIZE_MODES)}")]
    for ok, message in checks:
        if not ok:
            raise RecordError(message)
    parse_policy(opts.policy)


def plan_episodes(opts: RecordOptions) -> list[EpisodeJob]:
    counts = {"train": opts.episodes, "holdout": opts.holdout_count}
    return [EpisodeJob(split, i, episode_seed(opts.seed, split, i)) for split in SPLITS for i in range(counts[split])]


def _check_existing(out: Path, settings: dict, opts: RecordOptions) -> None:
    """Refuse to mix episodes recorded with other settings into ``out`` (unless --overwrite)."""
    path = out / RECORD_FILE
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        previous = {}
    if previous.get("settings") == settings:
        on_disk = {s: len([v for v in (out / s).glob("episode-*.mp4") if ".tmp" not in v.name]) for s in SPLITS}
        wanted = {"train": opts.episodes, "holdout": opts.holdout_count}
        extra = [s for s in SPLITS if on_disk[s] > wanted[s]]
        if extra and not opts.overwrite:
            s = extra[0]
            raise RecordError(f"{out / s} holds {on_disk[s]} episodes but this run records {wanted[s]}; "
                              "ask for at least as many, use a new --out, or pass --overwrite")
        if not extra:
            return
    elif not opts.overwrite:
        old = previous.get("settings", {})
        changed = [k for k in sorted(set(settings) | set(old)) if settings.get(k) != old.get(k)]
        detail = "; ".join(f"{k}: was {json.dumps(old.get(k))}, now {json.dumps(settings.get(k))}" for k in changed)
        raise RecordError(f"{out} holds a recording made with other settings ({detail or 'unreadable'}); "
                          "use a new --out or pass --overwrite to start again")
    for split in SPLITS:
        for file in (out / split).glob("episode-*"):
            file.unlink()
    path.unlink()


def _remove_temporaries(folder: Path) -> None:
    for file in folder.glob("*"):
        if ".tmp" in file.name:
            file.unlink()


def _episode_complete(folder: Path, job: EpisodeJob, digest: str) -> dict | None:
    video, meta = folder / f"{job.name}.mp4", folder / f"{job.name}.json"
    if not (video.is_file() and meta.is_file() and (folder / f"{job.name}{ACTIONS_SUFFIX}").is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None
    return info if info.get("settings_digest") == digest else None


# -- one episode (runs in a worker process) -----------------------------------------------------

_WORKER: dict = {}


def _worker_env(opts: RecordOptions) -> GameEnv:
    env = _WORKER.get("env")
    if env is None:
        env = _WORKER["env"] = _open_env(opts)
    return env


def play_episode(env: GameEnv, opts: RecordOptions, job: EpisodeJob) -> tuple[np.ndarray, np.ndarray, dict]:
    """Native-resolution frames (T, H, W, 3), actions (T,) with actions[t] producing frame t, and facts."""
    spec = parse_policy(opts.policy)
    policy = make_policy(spec, env.num_actions, policy_rng(opts.seed, job.split, job.index))
    frame = env.reset(job.env_seed)
    frames, actions = [frame], [NOOP_ACTION]
    resets, ended_at, total_reward = [], None, 0.0
    while len(frames) < opts.frames:
        chosen = policy(frame)
        try:
            action = env.check_action(chosen)
        except EnvError:
            raise RecordError(f"policy {spec.text!r} returned action {chosen!r} for frame {len(frames)} of "
                              f"{job.split} {job.name}; {env.env_id} has action ids 0..{env.num_actions - 1} "
                              f"({', '.join(f'{i}={n}' for i, n in enumerate(env.action_names))})") from None
        step = env.step(action)
        frame = step.frame
        frames.append(frame)
        actions.append(action)
        total_reward += step.reward
        if step.ended:
            if not opts.reset_on_end:
                ended_at = len(frames) - 1
                break
            if len(frames) < opts.frames:
                frame = env.reset(None)  # the next episode of the same seeded stream
                frames.append(frame)
                actions.append(NOOP_ACTION)
                resets.append(len(frames) - 1)
    facts = {"split": job.split, "index": job.index, "env_seed": job.env_seed, "frames": len(frames),
             "ended_at": ended_at, "resets": resets, "reward": total_reward}
    return np.stack(frames), np.asarray(actions, dtype=np.int64), facts


def record_episode(job: EpisodeJob, opts: RecordOptions, digest: str) -> dict:
    env = _worker_env(opts)
    resize = opts.resize or env.default_resize
    native, actions, facts = play_episode(env, opts, job)
    frames = np.stack([resize_frame(f, opts.size, resize) for f in native])
    folder = opts.out / job.split
    atomic_save_npy(folder / f"{job.name}{ACTIONS_SUFFIX}", actions)
    facts = {**facts, "native_shape": list(native.shape[1:]), "settings_digest": digest}
    atomic_write_json(folder / f"{job.name}.json", facts)
    write_mp4(frames, folder / f"{job.name}.mp4", fps=opts.fps, lossless=True)  # last: marks the episode complete
    return facts




# -- the driver --------------------------------------------------------------------------------

def record(opts: RecordOptions) -> RecordSummary:
    _validate(opts)
    env = _open_env(opts)  # fails here, naming the env, before anything is written
    try:
        settings = recording_settings(opts, env)
        names = list(env.action_names)
    finally:
        env.close()
    digest = settings_digest(settings)
    opts.out.mkdir(parents=True, exist_ok=True)
    _check_existing(opts.out, settings, opts)
    for split in SPLITS:
        (opts.out / split).mkdir(exist_ok=True)
        _remove_temporaries(opts.out / split)
    jobs = plan_episodes(opts)
    done = {(j.split, j.index): info for j in jobs if (info := _episode_complete(opts.out / j.split, j, digest))}
    todo = [j for j in jobs if (j.split, j.index) not in done]
    base = {"format": RECORD_FORMAT, "env": opts.env, "actions": {"num_classes": len(names), "names": names},
            "settings": settings, "settings_digest": digest,
            "episodes": {"train": opts.episodes, "holdout": opts.holdout_count},
            "seeds": "training episode i: 2*(seed*1000003+i) mod 2**31 (even); held-out episode j: the same "
                     "plus 1 (odd); policies draw from numpy default_rng([seed, split, index, 0])"}
    atomic_write_json(opts.out / RECORD_FILE, {**base, "complete": False})
    start = time.perf_counter()
    summary = RecordSummary(kept=len(done))
    for job, info in _run(todo, opts, digest):
        done[(job.split, job.index)] = info
        summary.recorded += 1
    summary.seconds = time.perf_counter() - start
    summary.episodes = {s: [done[(j.split, j.index)] for j in jobs if j.split == s] for s in SPLITS}
    everything = [e for s in SPLITS for e in summary.episodes[s]]
    summary.frames = sum(e["frames"] for e in everything)
    summary.short = sum(e["frames"] < opts.frames for e in everything)
    per_split = {s: {"episodes": len(summary.episodes[s]), "frames": sum(e["frames"] for e in summary.episodes[s]),
                     "short_episodes": sum(e["frames"] < opts.frames for e in summary.episodes[s]),
                     "episode_seeds": [e["env_seed"] for e in summary.episodes[s]]} for s in SPLITS}
    record_file = {**base, "complete": True, "frames": summary.frames, "short_episodes": summary.short,
                   "splits": per_split}
    atomic_write_json(opts.out / RECORD_FILE, record_file)  # last: the recording is complete
    summary.record_file = opts.out / RECORD_FILE
    return summary


def _run(todo: list[EpisodeJob], opts: RecordOptions, digest: str):
    bar = tqdm(total=len(todo), desc=f"record {opts.env}", unit="episode", disable=not opts.progress,
               file=sys.stderr)
    frames = 0
    try:
        if opts.workers == 1 or len(todo) <= 1:
            _WORKER.clear()
            for job in todo:
                info = record_episode(job, opts, digest)
                frames += info["frames"]
                bar.set_postfix(frames=frames, refresh=False)
                bar.update()
                yield job, info
            return
        context = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ProcessPoolExecutor(min(opts.workers, len(todo)), mp_context=context, initializer=_WORKER.clear)
        try:
            futures = {pool.submit(record_episode, job, opts, digest): job for job in todo}
            for future in as_completed(futures):
                info = future.result()
                frames += info["frames"]
                bar.set_postfix(frames=frames, refresh=False)
                bar.update()
                yield futures[future], info
        finally:
            # on an error (a bad policy action), stop instead of recording every queued episode first
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
        env = _WORKER.pop("env", None)
        if env is not None:
            env.close()
