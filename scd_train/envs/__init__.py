"""Game worlds as data sources and as ground truth: Atari games (gymnasium + ale-py) and crafter.

    env = make_env("ALE/Breakout-v5")          # or make_env("crafter")
    frame = env.reset(seed=0)                   # uint8 (H, W, 3)
    step = env.step(env.action_names.index("RIGHT"))
    state = env.snapshot(); ...; env.restore(state)

Nothing here knows models, latents or shards: ``scd-data record`` and the emulator-grounded
evaluation both build on it. ``python -m scd_train.envs`` lists the ids.
"""

from __future__ import annotations

from scd_train.envs.base import NOOP_ACTION, EnvError, GameEnv, Step
from scd_train.envs.frames import RESIZE_MODES, resize_frame, resize_frames
from scd_train.envs.policies import PolicySpec, make_policy, parse_policy
from scd_train.envs.seeds import episode_seed, policy_rng

CRAFTER = "crafter"

__all__ = ["CRAFTER", "NOOP_ACTION", "RESIZE_MODES", "EnvError", "GameEnv", "PolicySpec", "Step", "available_envs",
           "episode_seed", "make_env", "make_policy", "parse_policy", "policy_rng", "resize_frame", "resize_frames"]


def make_env(env_id: str, frameskip: int | None = None, sticky_actions: float = 0.0) -> GameEnv:
    """A running world. ``frameskip`` None keeps the world's default (Atari 4, crafter 1);
    ``sticky_actions`` is the ALE's repeat-action probability (crafter has none)."""
    if env_id == CRAFTER:
        if sticky_actions:
            raise EnvError(f"crafter has no sticky actions (got sticky_actions={sticky_actions})")
        from scd_train.envs.crafter import CrafterEnv

        return CrafterEnv(frameskip)
    from scd_train.envs.atari import PREFIX, AtariEnv, atari_ids, unknown_id_message

    if not env_id.startswith(PREFIX):
        raise EnvError(unknown_id_message(env_id, atari_ids()).replace(
            "unknown env", "unsupported env", 1) + "; supported: crafter and Atari ids such as ALE/Breakout-v5")
    return AtariEnv(env_id, frameskip, sticky_actions)


def available_envs() -> list[str]:
    from scd_train.envs.atari import atari_ids

    return [CRAFTER, *atari_ids()]
