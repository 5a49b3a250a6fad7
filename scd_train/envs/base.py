"""The adapter every game world implements: reset, step, an action vocabulary, and branching.

A world is a data source (``scd-data record`` plays it) and a ground truth (the emulator-grounded
evaluation replays it). Both see only this interface, so neither knows which game it runs, and an
adapter knows nothing of models, latents or shards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from scd_train.errors import InputError

NOOP_ACTION = 0
"""The id stored for a frame no action led to (the first frame, a frame after a reset): id 0 is the
no-op in every supported world."""


class EnvError(InputError):
    """A world that cannot be made or started, or an action it does not have; names the env and value."""


@dataclass(frozen=True)
class Step:
    frame: np.ndarray  # (H, W, 3) uint8, the frame the game shows after the action
    reward: float
    ended: bool  # the episode is over (terminated or truncated); reset before stepping again


class GameEnv(ABC):
    """One running world. Frames are uint8 (H, W, 3) RGB at the game's own resolution."""

    env_id: str
    action_names: tuple[str, ...]
    # how recordings fit this world's frames into a square: "stretch" or "crop" (scd_train.envs.frames)
    default_resize: str = "crop"

    @property
    def num_actions(self) -> int:
        return len(self.action_names)

    @abstractmethod
    def reset(self, seed: int | None) -> np.ndarray:
        """Start an episode and return its first frame. A seed makes the episode a pure function of it;
        None starts the next episode of the stream the last seed began."""

    @abstractmethod
    def step(self, action: int) -> Step:
        """Apply ``action`` (an id in [0, num_actions)) for one agent step."""

    @abstractmethod
    def snapshot(self) -> object:
        """An opaque handle on the current state; ``restore`` returns to it, any number of times."""

    @abstractmethod
    def restore(self, snapshot: object) -> None:
        """Return to a state from ``snapshot``; the steps that follow are those that followed it."""

    @abstractmethod
    def settings(self) -> dict:
        """Everything that decides this world's dynamics (id, frame skip, sticky actions, versions)."""

    def close(self) -> None:  # noqa: B027  adapters without resources keep the default
        """Release the emulator."""

    def check_action(self, action: object) -> int:
        """``action`` as an int id, or an EnvError naming the value and the valid ids."""
        valid = isinstance(action, (int, np.integer)) and not isinstance(action, bool)
        if not valid or not 0 <= int(action) < self.num_actions:
            raise EnvError(f"{self.env_id}: action {action!r} is not an id in [0, {self.num_actions}) "
                           f"({', '.join(f'{i}={n}' for i, n in enumerate(self.action_names))})")
        return int(action)

    def check_frame(self, frame: np.ndarray) -> np.ndarray:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise EnvError(f"{self.env_id} returned a frame of shape {frame.shape} and dtype {frame.dtype}; "
                           "expected (H, W, 3) uint8 RGB")
        return frame
