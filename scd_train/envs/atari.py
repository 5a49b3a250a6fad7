"""Atari games through gymnasium and the Arcade Learning Environment (the ROMs ship inside ale-py).

Sticky actions are off unless asked (``repeat_action_probability=0``), so an episode is a pure
function of its seed and its actions. Branching uses the ALE's own state clone, RNG included.
"""

from __future__ import annotations

import difflib
from importlib.metadata import version

import numpy as np

from scd_train.envs.base import EnvError, GameEnv, Step

PREFIX = "ALE/"
DEFAULT_FRAMESKIP = 4  # the v5 games' own default: one agent step = 4 emulator frames
LIST_HINT = "`python -m scd_train.envs` lists the valid ids"


def _gymnasium():
    import ale_py
    import gymnasium

    gymnasium.register_envs(ale_py)
    return gymnasium


def atari_ids() -> list[str]:
    """Every registered ALE game id (``ALE/Breakout-v5``, ...)."""
    gymnasium = _gymnasium()
    return sorted(k for k in gymnasium.registry if k.startswith(PREFIX))


def unknown_id_message(env_id: str, known: list[str]) -> str:
    near = difflib.get_close_matches(env_id, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return f"unknown env {env_id!r}{hint} ({LIST_HINT}: crafter and {len(known)} Atari games)"


class AtariEnv(GameEnv):
    default_resize = "stretch"  # 210x160 frames: a centre crop to a square would cut off the paddle rows

    def __init__(self, env_id: str, frameskip: int | None = None, sticky_actions: float = 0.0) -> None:
        gymnasium = _gymnasium()
        known = atari_ids()
        if env_id not in known:
            raise EnvError(unknown_id_message(env_id, known))
        self.env_id = env_id
        self.frameskip = DEFAULT_FRAMESKIP if frameskip is None else int(frameskip)  # the ALE checks its range
        if not 0.0 <= sticky_actions < 1.0:
            raise EnvError(f"{env_id}: sticky action probability {sticky_actions} must be in [0, 1)")
        self.sticky_actions = float(sticky_actions)
        try:
            self._env = gymnasium.make(env_id, frameskip=self.frameskip,
                                       repeat_action_probability=self.sticky_actions)
            self._ale = self._env.unwrapped
            self.action_names = tuple(self._ale.get_action_meanings())
        except Exception as exc:  # the ALE raises many types for a ROM or emulator that will not start
            raise EnvError(f"{env_id} failed to start ({type(exc).__name__}: {exc})") from None

    def reset(self, seed: int | None) -> np.ndarray:
        frame, _ = self._env.reset(seed=seed)
        return self.check_frame(frame)

    def step(self, action: int) -> Step:
        frame, reward, terminated, truncated, _ = self._env.step(self.check_action(action))
        return Step(self.check_frame(frame), float(reward), bool(terminated or truncated))

    def snapshot(self) -> object:
        return self._ale.clone_state(include_rng=True)

    def restore(self, snapshot: object) -> None:
        self._ale.restore_state(snapshot)

    def settings(self) -> dict:
        return {"env": self.env_id, "family": "atari", "frameskip": self.frameskip,
                "sticky_actions": self.sticky_actions, "full_action_space": False,
                "versions": {"gymnasium": version("gymnasium"), "ale-py": version("ale-py")}}

    def close(self) -> None:
        self._env.close()
