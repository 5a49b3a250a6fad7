"""Crafter (a Minecraft-like open world, 64x64 frames, 17 actions) through crafter's own ``Env``.

Two things make it exact enough to serve as ground truth:

- crafter keeps the creatures of each map chunk in Python sets and picks which to spawn or despawn
  by iterating them; a set of objects iterates in memory-address order, so the same seed and the
  same actions could give different worlds in two processes. The world here keeps each chunk's
  members in insertion order instead, which makes an episode a pure function of (seed, actions).
- branching re-seeds and replays: a snapshot is (seed, episode, actions since the reset), and
  restoring regenerates that episode's world and replays the actions. World generation (pure-Python
  simplex noise) takes seconds, so the freshly generated world of each episode is kept and copied
  instead of generated again; the copy is the state the generator produces, byte for byte.
"""

from __future__ import annotations

import collections
import copy
from dataclasses import dataclass
from importlib.metadata import version

import crafter
import numpy as np
from crafter import engine

from scd_train.envs.base import EnvError, GameEnv, Step

ENV_ID = "crafter"
EPISODE_LENGTH = 10000  # crafter's own default: an episode ends at death or after this many steps
WORLD_CACHE = 8  # freshly generated worlds kept for restores (a few hundred kB each)


class _OrderedSet:
    """The set operations crafter's chunks use, iterating in insertion order."""

    def __init__(self) -> None:
        self._items: dict = {}

    def add(self, item) -> None:
        self._items[item] = None

    def remove(self, item) -> None:
        del self._items[item]

    def __iter__(self):
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)


class _OrderedWorld(engine.World):
    def reset(self, seed=None) -> None:
        super().reset(seed)
        self._chunks = collections.defaultdict(_OrderedSet)


@dataclass(frozen=True)
class CrafterSnapshot:
    seed: int
    episode: int  # 1 for the first episode after a seed
    actions: tuple[int, ...]  # agent steps since that episode's reset


class CrafterEnv(GameEnv):
    default_resize = "crop"  # square frames: only scaled

    def __init__(self, frameskip: int | None = None, length: int = EPISODE_LENGTH) -> None:
        self.env_id = ENV_ID
        self.frameskip = 1 if frameskip is None else int(frameskip)
        if self.frameskip < 1:
            raise EnvError(f"crafter: frameskip {self.frameskip} must be >= 1")
        self.length = length
        self.action_names = tuple(crafter.constants.actions)
        self._env = None  # the running episode
        self._seed: int | None = None
        self._episode = 0
        self._actions: list[int] = []
        self._fresh: collections.OrderedDict[tuple[int, int], object] = collections.OrderedDict()

    # -- episodes --------------------------------------------------------------------------------
    def reset(self, seed: int | None) -> np.ndarray:
        if seed is None and self._seed is None:
            raise EnvError("crafter: the first reset needs a seed")
        if seed is not None:
            self._seed, self._episode = int(seed), 0
        self._episode += 1
        self._env = self._fresh_world(self._seed, self._episode)
        self._actions = []
        return self.check_frame(self._env.render())

    def _fresh_world(self, seed: int, episode: int):
        """A copy of episode ``episode``'s world right after its reset, generated at most once."""
        key = (seed, episode)
        if key not in self._fresh:
            try:
                env = crafter.Env(seed=seed, length=self.length)
                env._world.__class__ = _OrderedWorld  # before the reset below generates the world
                env._episode = episode - 1  # crafter seeds episode e's world with hash((seed, e))
                env.reset()
            except Exception as exc:
                raise EnvError(f"crafter failed to start with seed {seed} ({type(exc).__name__}: {exc})") from None
            self._fresh[key] = env
            while len(self._fresh) > WORLD_CACHE:
                self._fresh.popitem(last=False)
        self._fresh.move_to_end(key)
        return _copy(self._fresh[key])

    def step(self, action: int) -> Step:
        action = self.check_action(action)
        if self._env is None:
            raise EnvError("crafter: step before reset")
        reward, done, frame = 0.0, False, None
        for _ in range(self.frameskip):
            frame, r, done, _ = self._env.step(action)
            reward += float(r)
            if done:
                break
        self._actions.append(action)
        return Step(self.check_frame(frame), reward, bool(done))

    # -- branching -------------------------------------------------------------------------------
    def snapshot(self) -> CrafterSnapshot:
        if self._seed is None:
            raise EnvError("crafter: snapshot before reset")
        return CrafterSnapshot(self._seed, self._episode, tuple(self._actions))

    def restore(self, snapshot: object) -> None:
        if not isinstance(snapshot, CrafterSnapshot):
            raise EnvError(f"crafter: {snapshot!r} is not a crafter snapshot")
        self._seed, self._episode = snapshot.seed, snapshot.episode
        self._env = self._fresh_world(snapshot.seed, snapshot.episode)
        self._actions = []
        for action in snapshot.actions:
            self.step(action)

    def settings(self) -> dict:
        return {"env": ENV_ID, "family": "crafter", "frameskip": self.frameskip, "episode_length": self.length,
                "versions": {"crafter": version("crafter")}}


def _copy(env):
    # textures are read-only image caches: share them instead of copying them
    return copy.deepcopy(env, {id(env._textures): env._textures})
