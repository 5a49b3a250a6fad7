"""What a player can do: the model's action names, the keys that trigger them, and scripts.

Names come from the run's data: the shard manifest's ``actions.names`` when it records them, the
moving-digits names for ``data.source=synthetic``, else ``action 0`` .. ``action n-1``. Keys are
given by meaning first (a direction to the arrow key and its WASD twin, fire/jump/do to space) and
then in order from the number row and the remaining letters, so every action has a key.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from scd_train.config import Config
from scd_train.errors import InputError

log = logging.getLogger(__name__)

DIRECTION_KEYS = {"right": ("ArrowRight", "d"), "left": ("ArrowLeft", "a"), "up": ("ArrowUp", "w"),
                  "down": ("ArrowDown", "s")}
PRIMARY_WORDS = ("fire", "jump", "do", "shoot", "interact", "action")
# Names that mean "do nothing": frames without a key use that action rather than the null id.
IDLE_WORDS = ("noop", "no-op", "no_op", "none", "idle", "nothing")
SPARE_KEYS = tuple("1234567890") + tuple("qertyuiopfghjklzxcvbnm")
KEY_LABELS = {"ArrowRight": "→", "ArrowLeft": "←", "ArrowUp": "↑", "ArrowDown": "↓", " ": "Space"}
# Script tokens that mean "no key" (the idle action).
SCRIPT_IDLE = ("idle", "null", "-")


@dataclass(frozen=True)
class ActionKey:
    action: int
    name: str
    keys: tuple[str, ...]  # KeyboardEvent.key values, letters lower-case

    @property
    def label(self) -> str:
        return " / ".join(KEY_LABELS.get(k, k.upper()) for k in self.keys)


@dataclass(frozen=True)
class ActionSet:
    """The actions of one model, their keys, and what a frame without a key uses."""

    names: tuple[str, ...]
    keys: tuple[ActionKey, ...]
    idle: int | None  # action id used when no key is held; None = the model's null action
    source: str  # where the names came from, shown on the page

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def idle_label(self) -> str:
        if not self.names:
            return "null action (this model takes no actions)"
        return self.names[self.idle] if self.idle is not None else "null action (unconditional)"

    def name_of(self, action: int | None) -> str:
        return "null" if action is None else self.names[action]

    def check(self, action: object) -> int:
        """A valid action id, or ValueError naming the accepted range."""
        if isinstance(action, bool) or not isinstance(action, int) or not 0 <= action < self.count:
            accepted = f"an integer in [0, {self.count - 1}]" if self.count else "no actions (the model has none)"
            raise ValueError(f"action {action!r} is not valid; expected {accepted}")
        return action

    def to_dict(self) -> dict:
        return {"names": list(self.names), "source": self.source, "idle": self.idle, "idle_label": self.idle_label,
                "keys": [{"action": k.action, "name": k.name, "keys": list(k.keys), "label": k.label}
                         for k in self.keys]}


def action_names(cfg: Config) -> tuple[tuple[str, ...], str]:
    """(names, where they came from) for the model's ``num_actions`` actions."""
    count = cfg.model.num_actions
    if count == 0:
        return (), "the model takes no actions"
    names, source = _recorded_names(cfg)
    if names is None:
        return tuple(f"action {i}" for i in range(count)), "numbered (the data records no action names)"
    if len(names) != count:
        log.warning("%s names %d actions but the model has model.num_actions=%d; unnamed ones are numbered",
                    source, len(names), count)
        names = (list(names) + [f"action {i}" for i in range(len(names), count)])[:count]
    return tuple(str(n) for n in names), source


def _recorded_names(cfg: Config) -> tuple[list[str] | None, str]:
    if cfg.data.source == "synthetic":
        from scd_train.data.synthetic import ACTION_NAMES

        return list(ACTION_NAMES), "moving digits (data.source=synthetic)"
    for setting in ("path", "holdout_path"):
        root = getattr(cfg.data, setting)
        if root is None:
            continue
        try:
            from scd_train.data.manifest import load_manifest

            manifest = load_manifest(root, f"data.{setting}")
        except (ValueError, OSError) as exc:  # unreadable here: fall back to numbered names
            log.info("action names: %s", exc)
            continue
        names = (manifest.raw.get("actions") or {}).get("names")
        if isinstance(names, list) and names:
            return names, f"{Path(root) / 'manifest.json'}"
    return None, ""


def build_action_set(cfg: Config) -> ActionSet:
    names, source = action_names(cfg)
    return ActionSet(names, assign_keys(names), idle_action(names), source)


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w != "move"]


def idle_action(names: tuple[str, ...]) -> int | None:
    for i, name in enumerate(names):
        if name.lower().strip() in IDLE_WORDS or _words(name) in (["noop"], ["no", "op"], ["none"], ["idle"]):
            return i
    return None


def assign_keys(names: tuple[str, ...]) -> tuple[ActionKey, ...]:
    """Keys by meaning first, then spare keys in order; no key is given twice."""
    chosen: dict[int, tuple[str, ...]] = {}
    taken: set[str] = set()
    idle = idle_action(names)
    for i, name in enumerate(names):
        if i == idle:
            continue
        words = _words(name)
        wanted: tuple[str, ...] = ()
        if len(words) == 1 and words[0] in DIRECTION_KEYS:
            wanted = DIRECTION_KEYS[words[0]]
        elif len(words) == 1 and words[0] in PRIMARY_WORDS:
            wanted = (" ",)
        if wanted and not taken.intersection(wanted):
            chosen[i] = wanted
            taken.update(wanted)
    spare = (k for k in SPARE_KEYS if k not in taken)
    for i in range(len(names)):
        if i in chosen or i == idle:  # the idle action is what "no key" plays
            continue
        key = next(spare, None)
        if key is None:
            log.warning("no key left for action %d (%s); it can only be scripted", i, names[i])
            continue
        chosen[i] = (key,)
    return tuple(ActionKey(i, names[i], chosen[i]) for i in sorted(chosen))


def parse_script(text: str, actions: ActionSet) -> list[int | None]:
    """``right*8, down*4, idle*2, 0`` -> one action per frame (None: the idle action).

    A token is an action name (case-insensitive; quote names with spaces as ``action_0`` or use the
    index), its index, or ``idle``; ``*N`` repeats it. ``text`` may also be a path to a file
    holding such a script.
    """
    path = Path(text)
    if len(text) < 4096 and path.is_file():
        text = path.read_text()
    by_name = {n.lower(): i for i, n in enumerate(actions.names)}
    by_name.update({n.lower().replace(" ", "_"): i for i, n in enumerate(actions.names)})
    frames: list[int | None] = []
    for token in (t for t in re.split(r"[,\s]+", text.strip()) if t):
        word, _, repeat = token.partition("*")
        try:
            count = int(repeat) if repeat else 1
        except ValueError:
            raise InputError(f"--script: {token!r}: the repeat after '*' must be an integer") from None
        if count < 1:
            raise InputError(f"--script: {token!r}: the repeat must be at least 1")
        frames += [_script_action(word, by_name, actions)] * count
    if not frames:
        raise InputError("--script is empty: give actions such as 'right*8,down*4,idle*2'")
    return frames


def _script_action(word: str, by_name: dict[str, int], actions: ActionSet) -> int | None:
    key = word.lower()
    if key in SCRIPT_IDLE:
        return actions.idle
    if key in by_name:
        return by_name[key]
    if key.isdigit() and int(key) < actions.count:
        return int(key)
    known = ", ".join(actions.names) if actions.names else "none (the model takes no actions)"
    raise InputError(f"--script: {word!r} is not an action of this model; its actions are {known} "
                     f"(or an index 0-{max(actions.count - 1, 0)}, or 'idle')")
