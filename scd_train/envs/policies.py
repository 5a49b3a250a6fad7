"""Who chooses the actions while a world is recorded or replayed.

``random``: uniform over the action ids. ``sticky`` (``sticky:K``): a uniformly random action held
for a uniformly random 1..K agent steps (K = 8 by default); uniform random agents jitter in place,
while held actions move the player, the paddle or the view far enough to be worth predicting.
``module:function``: a user's policy, called with the current frame (uint8 (H, W, 3)) and
returning an action id. The two built-in names take precedence over a module of the same name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from scd_train.envs.base import EnvError

DEFAULT_MAX_HOLD = 8

Policy = Callable[[np.ndarray], int]


@dataclass(frozen=True)
class PolicySpec:
    kind: str  # "random", "sticky" or "function"
    max_hold: int = DEFAULT_MAX_HOLD  # sticky only
    target: str = ""  # function only: "module:function"

    def to_dict(self) -> dict:
        if self.kind == "sticky":
            return {"kind": "sticky", "max_hold": self.max_hold}
        if self.kind == "function":
            return {"kind": "function", "target": self.target}
        return {"kind": self.kind}

    @property
    def text(self) -> str:
        if self.kind == "sticky":
            return "sticky" if self.max_hold == DEFAULT_MAX_HOLD else f"sticky:{self.max_hold}"
        return self.target if self.kind == "function" else self.kind


def parse_policy(spec: str) -> PolicySpec:
    """``random``, ``sticky``, ``sticky:K`` or ``module:function``; anything else is an EnvError."""
    if spec == "random":
        return PolicySpec("random")
    if spec == "sticky" or spec.startswith("sticky:"):
        hold = spec.partition(":")[2] or str(DEFAULT_MAX_HOLD)
        if not hold.isdigit() or int(hold) < 1:
            raise EnvError(f"policy {spec!r}: sticky:K needs a whole number K >= 1 (the longest hold)")
        return PolicySpec("sticky", max_hold=int(hold))
    module, sep, function = spec.partition(":")
    if not sep or not module or not function:
        raise EnvError(f"policy {spec!r} is not 'random', 'sticky', 'sticky:K' or 'module:function'")
    return PolicySpec("function", target=spec)


def make_policy(spec: PolicySpec, num_actions: int, rng: np.random.Generator) -> Policy:
    """A fresh policy for one episode; built-in policies draw only from ``rng``."""
    if spec.kind == "random":
        return lambda frame: int(rng.integers(num_actions))
    if spec.kind == "sticky":
        return StickyPolicy(num_actions, spec.max_hold, rng)
    return _import_function(spec.target)


class StickyPolicy:
    """A random action repeated for a random 1..max_hold steps, then another."""

    def __init__(self, num_actions: int, max_hold: int, rng: np.random.Generator) -> None:
        self.num_actions, self.max_hold, self.rng = num_actions, max_hold, rng
        self.action, self.left = 0, 0

    def __call__(self, frame: np.ndarray) -> int:
        if self.left == 0:
            self.action = int(self.rng.integers(self.num_actions))
            self.left = int(self.rng.integers(1, self.max_hold + 1))
        self.left -= 1
        return self.action


def _import_function(target: str) -> Policy:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise EnvError(f"policy {target!r}: module {module_name!r} cannot be imported "
                       f"({type(exc).__name__}: {exc})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise EnvError(f"policy {target!r}: {module_name} has no callable {attr!r}")
    return function
