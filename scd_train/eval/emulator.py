"""Ground truth from the game itself: held-out game states, real rollouts and real branches.

The world, its settings and the resize rule come from the ``source`` block that ``scd-data encode``
copies from ``record.json`` into the shard manifest, so the evaluation replays exactly the game the
model was trained on. States come from held-out episode seeds (odd seeds, which no training episode
ever uses): an episode is played with the recording's policy for a random number of warm-up steps,
the last ``context`` frames become the models' context, and the emulator state there is saved.
From that state the real game plays the rollout actions (scored at horizons 1, 4, 16, ...) and,
restored each time, every branch's actions (scored by action accuracy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from scd_train.config import ConfigError
from scd_train.envs import (
    NOOP_ACTION,
    GameEnv,
    PolicySpec,
    episode_seed,
    make_env,
    make_policy,
    policy_rng,
    resize_frame,
)
from scd_train.envs.policies import DEFAULT_MAX_HOLD, StickyPolicy
from scd_train.errors import InputError

ROLLOUT_STREAM, BRANCH_STREAM = 1, 2  # policy streams apart from the recording's own (stream 0)


@dataclass
class EmulatorProtocol:
    # held-out game states evaluated
    starts: int = 16
    # real frames each model is conditioned on
    context: int = 4
    # generated frames at which rollouts are scored (frame 1 = next-frame prediction)
    horizons: list[int] = field(default_factory=lambda: [1, 4, 16])
    # action sequences replayed from each state, in the game and in every model
    branches: int = 2
    # frames each branch runs
    branch_frames: int = 8
    # steps of the recording's policy played before the context, drawn uniformly from 0..warmup
    warmup: int = 48
    # denoising steps per frame; None uses each model's diffusion.sample_steps
    steps: int | None = None
    seed: int = 0
    # states whose branches are written as side-by-side videos (real | each model)
    videos: int = 3
    # states rolled out together in one model call
    batch: int = 8

    @property
    def rollout_frames(self) -> int:
        return max(self.horizons)

    def validate(self) -> None:
        for name in ("starts", "context", "branch_frames", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"emulator.{name}={getattr(self, name)} must be >= 1")
        if self.branches < 2:
            raise ConfigError(f"emulator.branches={self.branches} must be >= 2 (action accuracy compares branches)")
        if not self.horizons or min(self.horizons) < 1:
            raise ConfigError(f"emulator.horizons={self.horizons} must be positive frame counts")
        if self.warmup < 0 or self.videos < 0:
            raise ConfigError("emulator.warmup and emulator.videos must be >= 0")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"emulator.steps={self.steps} must be >= 1 or None")


@dataclass(frozen=True)
class WorldSpec:
    """The recorded world as the manifest describes it."""

    env: str
    frameskip: int
    sticky_actions: float
    size: int
    resize: str
    policy: PolicySpec
    seed: int  # the recording's seed, which decides its held-out episode seeds

    @classmethod
    def from_source(cls, source: dict | None, where: str) -> WorldSpec:
        if not source or source.get("kind") != "record":
            kind = None if not source else source.get("kind")
            raise InputError(f"{where} records source kind {kind!r}: the emulator evaluation needs a model "
                             "trained on clips made by `scd-data record` (the manifest's source block names the "
                             "game and how it was recorded)")
        world, policy = source["world"], source["policy"]
        if policy.get("kind") == "function":  # a user's policy may be deterministic: states would repeat
            spec = PolicySpec("sticky", DEFAULT_MAX_HOLD)
        else:
            spec = PolicySpec(policy["kind"], int(policy.get("max_hold", DEFAULT_MAX_HOLD)))
        return cls(env=source["env"], frameskip=int(world["frameskip"]),
                   sticky_actions=float(world.get("sticky_actions", 0.0)), size=int(source["size"]),
                   resize=source["resize"], policy=spec, seed=int(source["recordings"][0]["seed"]))

    def make_env(self) -> GameEnv:
        return make_env(self.env, self.frameskip, self.sticky_actions)

    def square(self, frame: np.ndarray) -> np.ndarray:
        return resize_frame(frame, self.size, self.resize)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["policy"] = self.policy.to_dict()
        return out


@dataclass
class GameState:
    """One held-out state and what the real game did from it. Frames are square uint8 (T, S, S, 3)."""

    episode_seed: int
    warmup_steps: int
    context_frames: np.ndarray
    context_actions: np.ndarray  # (context,), action t produced context frame t (0 for a reset frame)
    rollout_actions: np.ndarray  # (rollout,)
    rollout_frames: np.ndarray
    branch_actions: np.ndarray  # (branches, branch_frames)
    branch_frames: np.ndarray  # (branches, branch_frames, S, S, 3)


class _EpisodeEnded(Exception):
    pass


def branch_actions(num_actions: int, branches: int, frames: int, max_hold: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``branches`` sticky action sequences whose first actions all differ."""
    if branches > num_actions:
        raise ConfigError(f"emulator.branches={branches} exceeds the world's {num_actions} actions")
    firsts = rng.choice(num_actions, size=branches, replace=False)
    out = np.empty((branches, frames), dtype=np.int64)
    for b, first in enumerate(firsts):
        policy = StickyPolicy(num_actions, max_hold, rng)
        policy.action, policy.left = int(first), int(rng.integers(1, max_hold + 1))
        out[b] = [policy(None) for _ in range(frames)]
    return out


def _play(env: GameEnv, actions, square) -> list[np.ndarray]:
    frames = []
    for action in actions:
        step = env.step(int(action))
        if step.ended:
            raise _EpisodeEnded
        frames.append(square(step.frame))
    return frames


def collect_state(env: GameEnv, world: WorldSpec, protocol: EmulatorProtocol, index: int) -> GameState | None:
    """The state of held-out episode ``index``, or None when that episode ends before its branches do."""
    seed = episode_seed(world.seed, "holdout", index)
    rng = policy_rng(protocol.seed, "holdout", index, ROLLOUT_STREAM)
    warmup = int(rng.integers(0, protocol.warmup + 1))
    policy = make_policy(world.policy, env.num_actions, rng)
    frame = env.reset(seed)
    frames, actions = [world.square(frame)], [NOOP_ACTION]
    try:
        for _ in range(warmup + protocol.context - 1):
            action = env.check_action(policy(frame))
            step = env.step(action)
            if step.ended:
                raise _EpisodeEnded
            frame = step.frame
            frames.append(world.square(frame))
            actions.append(action)
        snapshot = env.snapshot()
        rollout_actions = []
        for _ in range(protocol.rollout_frames):  # the policy keeps seeing the real frames
            rollout_actions.append(env.check_action(policy(frame)))
            step = env.step(rollout_actions[-1])
            if step.ended:
                raise _EpisodeEnded
            frame = step.frame
            frames.append(world.square(frame))
        branch_rng = policy_rng(protocol.seed, "holdout", index, BRANCH_STREAM)
        max_hold = world.policy.max_hold if world.policy.kind == "sticky" else 1
        per_branch = branch_actions(env.num_actions, protocol.branches, protocol.branch_frames, max_hold, branch_rng)
        branches = []
        for sequence in per_branch:
            env.restore(snapshot)
            branches.append(_play(env, sequence, world.square))
    except _EpisodeEnded:
        return None
    c = protocol.context
    start = len(actions) - c
    return GameState(episode_seed=seed, warmup_steps=warmup, context_frames=np.stack(frames[start:start + c]),
                     context_actions=np.asarray(actions[start:], dtype=np.int64),
                     rollout_actions=np.asarray(rollout_actions, dtype=np.int64),
                     rollout_frames=np.stack(frames[start + c:]), branch_actions=per_branch,
                     branch_frames=np.stack([np.stack(b) for b in branches]))


def collect_states(world: WorldSpec, protocol: EmulatorProtocol, max_episodes: int | None = None,
                   progress=None) -> tuple[list[GameState], int]:
    """``protocol.starts`` states from consecutive held-out episodes; also how many episodes ended too
    early and were passed over."""
    env = world.make_env()
    limit = max_episodes or 4 * protocol.starts + 8
    states, skipped, index = [], 0, 0
    try:
        while len(states) < protocol.starts:
            if index >= limit:
                raise InputError(f"{world.env}: only {len(states)} of {protocol.starts} held-out episodes lasted "
                                 f"{protocol.warmup} warm-up + {protocol.context} context + "
                                 f"{protocol.rollout_frames} rollout steps ({limit} tried); lower emulator.warmup "
                                 "or the horizons")
            state = collect_state(env, world, protocol, index)
            index += 1
            if state is None:
                skipped += 1
                continue
            states.append(state)
            if progress is not None:
                progress(len(states))
    finally:
        env.close()
    return states, skipped
