"""What the page sends: JSON messages (key presses and commands), and which key drives a frame.

Every message is a JSON object with a ``type``: ``press`` / ``release`` (``action``, ``seq``),
``pause`` / ``record`` (``on``), ``reset``, ``steps`` (``value``), ``rate`` (``fps``, 0 = unpaced).
Anything else (bad JSON, unknown types, out-of-range values) raises ``BadMessage`` saying why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_FPS = 240.0


class BadMessage(ValueError):
    """A message from the page that is ignored; the text says why."""


@dataclass
class Command:
    kind: str  # press, release, pause, reset, steps, record, rate
    value: object = None
    seq: int | None = None


def parse_message(text: str, action_count: int) -> Command:
    """One message from the page, validated; ``BadMessage`` says what is wrong with it."""
    try:
        data = json.loads(text)
    except ValueError:
        raise BadMessage("not JSON") from None
    if not isinstance(data, dict):
        raise BadMessage("not a JSON object")
    kind = data.get("type")
    seq = data.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise BadMessage(f"seq={seq!r} is not an integer")
    if kind in ("press", "release"):
        action = data.get("action")
        if isinstance(action, bool) or not isinstance(action, int) or not 0 <= action < action_count:
            valid = f"an integer in [0, {action_count - 1}]" if action_count else "none (the model takes no actions)"
            raise BadMessage(f"{kind}: action={action!r}; valid actions: {valid}")
        return Command(kind, action, seq)
    if kind in ("pause", "record"):
        on = data.get("on")
        if not isinstance(on, bool):
            raise BadMessage(f"{kind}: 'on' must be true or false, got {on!r}")
        return Command(kind, on, seq)
    if kind == "reset":
        return Command(kind, None, seq)
    if kind == "steps":
        steps = data.get("value")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise BadMessage(f"steps: value={steps!r} must be an integer from 1 to 1000")
        return Command(kind, steps, seq)
    if kind == "rate":
        fps = data.get("fps")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 <= fps <= MAX_FPS:
            raise BadMessage(f"rate: fps={fps!r} must be a number from 0 (as fast as possible) to {MAX_FPS:g}")
        return Command(kind, float(fps), seq)
    raise BadMessage(f"unknown message type {kind!r}")


class KeyState:
    """The action keys held on the page, and the last press since the previous frame.

    A tap that is pressed and released between two ticks still drives one frame; a held key drives
    every frame until it is released.
    """

    def __init__(self, idle: int | None) -> None:
        self.idle = idle
        self.held: dict[int, int | None] = {}  # action -> seq of its press, in press order
        self.tap: tuple[int, int | None] | None = None

    def press(self, action: int, seq: int | None) -> None:
        self.held.pop(action, None)
        self.held[action] = seq
        self.tap = (action, seq)

    def release(self, action: int) -> None:
        self.held.pop(action, None)

    def take(self) -> tuple[int | None, int | None]:
        """(action for the next frame, seq of the press it comes from)."""
        if self.tap is not None:
            tap, self.tap = self.tap, None
            return tap
        if self.held:
            action = next(reversed(self.held))
            return action, self.held[action]
        return self.idle, None
