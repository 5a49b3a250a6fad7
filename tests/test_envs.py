"""Game worlds: ids and start-up errors, determinism, exact branching (ALE state clones; crafter by
re-seeding and replaying, also across processes), the resize rules and the policies."""

from __future__ import annotations

import hashlib
import subprocess

import numpy as np
import pytest

from scd_train.envs import EnvError, make_env, make_policy, parse_policy, resize_frame
from scd_train.envs.crafter import CrafterEnv

BREAKOUT = "ALE/Breakout-v5"


def play(env, actions) -> np.ndarray:
    return np.stack([env.step(int(a)).frame for a in actions])


def test_unknown_ids_suggest_and_say_how_to_list_the_valid_ones():
    with pytest.raises(EnvError) as typo:
        make_env("ALE/Breakot-v5")
    assert "ALE/Breakout-v5" in str(typo.value) and "python -m scd_train.envs" in str(typo.value)
    with pytest.raises(EnvError) as other:
        make_env("CartPole-v1")
    assert "CartPole-v1" in str(other.value) and "crafter" in str(other.value)


def test_a_world_that_fails_to_start_is_named_with_the_emulators_reason():
    with pytest.raises(EnvError) as exc:
        make_env(BREAKOUT, frameskip=0)  # the ALE itself refuses this
    assert str(exc.value).startswith(f"{BREAKOUT} failed to start") and "frameskip" in str(exc.value)
    with pytest.raises(EnvError, match="sticky action probability 1.5"):
        make_env(BREAKOUT, sticky_actions=1.5)


def test_atari_episodes_are_pure_functions_of_seed_and_actions_and_branches_restore_exactly():
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 4, 60)
    first, second = make_env(BREAKOUT), make_env(BREAKOUT)
    assert first.action_names == ("NOOP", "FIRE", "RIGHT", "LEFT") and first.default_resize == "stretch"
    assert (first.reset(7) == second.reset(7)).all()
    np.testing.assert_array_equal(play(first, actions), play(second, actions))
    state = first.snapshot()
    right, left = np.full(12, 2), np.full(12, 3)
    went_right = play(first, right)
    first.restore(state)
    np.testing.assert_array_equal(play(first, right), went_right)
    first.restore(state)
    assert (play(first, left) != went_right).any(axis=(1, 2, 3)).sum() >= 6  # the paddle went the other way
    with pytest.raises(EnvError, match=r"action 4 is not an id in \[0, 4\)"):
        first.step(4)


CRAFTER_SCRIPT = """
import hashlib, sys
import numpy as np
from scd_train.envs.crafter import CrafterEnv
env = CrafterEnv()
env.reset(3)
actions = np.random.default_rng(1).integers(0, 17, 220)
frames = np.stack([env.step(int(a)).frame for a in actions])
print(hashlib.sha256(frames.tobytes()).hexdigest())
"""


def test_crafter_replays_exactly_across_processes_and_from_snapshots(subprocess_env, python_exe):
    env = CrafterEnv()
    assert len(env.action_names) == 17 and env.action_names[0] == "noop"
    env.reset(3)
    actions = np.random.default_rng(1).integers(0, 17, 220)
    frames = play(env, actions[:150])
    state = env.snapshot()
    tail = play(env, actions[150:])
    digest = hashlib.sha256(np.concatenate([frames, tail]).tobytes()).hexdigest()
    # another process, another hash seed and memory layout: crafter iterates chunk members in
    # insertion order here, so creature spawning and despawning cannot depend on addresses
    other = subprocess.run([python_exe, "-c", CRAFTER_SCRIPT], env={**subprocess_env, "PYTHONHASHSEED": "123"},
                           capture_output=True, text=True, timeout=300, check=True)
    assert other.stdout.split()[-1] == digest
    # restoring copies the kept freshly generated world and replays 150 actions; a copy that shared
    # state (e.g. its random generator) with the played world would give another future here
    env.restore(state)
    np.testing.assert_array_equal(play(env, actions[150:]), tail)


def test_resize_rules_keep_the_whole_frame_or_crop_its_centre():
    frame = np.zeros((210, 160, 3), np.uint8)
    frame[190:194, 60:100] = 255  # a paddle near the bottom, as in Breakout
    stretched = resize_frame(frame, 64, "stretch")
    cropped = resize_frame(frame, 64, "crop")
    assert stretched.shape == cropped.shape == (64, 64, 3)
    assert stretched[55:62].max() > 100  # still there
    assert cropped.max() == 0  # scale-to-cover then centre crop cuts the bottom rows off
    square = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert (resize_frame(square, 64, "crop") == square).all()
    with pytest.raises(ValueError, match="resize mode"):
        resize_frame(square, 32, "squash")


def test_policies_sticky_holds_random_is_uniform_and_user_functions_import(tmp_path, monkeypatch):
    sticky = make_policy(parse_policy("sticky:5"), 4, np.random.default_rng(0))
    choices = [sticky(None) for _ in range(400)]
    runs = np.diff(np.flatnonzero(np.diff(choices) != 0))
    assert runs.mean() > 2 and set(choices) == {0, 1, 2, 3}
    uniform = make_policy(parse_policy("random"), 4, np.random.default_rng(0))
    assert np.bincount([uniform(None) for _ in range(4000)], minlength=4).min() > 900
    (tmp_path / "my_agent.py").write_text("def right(frame):\n    return 2 if frame.mean() >= 0 else 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert make_policy(parse_policy("my_agent:right"), 4, np.random.default_rng(0))(np.zeros((4, 4, 3))) == 2
    for bad, message in (("sticky:0", "K >= 1"), ("greedy", "module:function"), ("my_agent:left", "no callable"),
                         ("no_such_module_x:f", "cannot be imported")):
        with pytest.raises(EnvError, match=message):
            make_policy(parse_policy(bad), 4, np.random.default_rng(0))


def test_env_listing_cli(subprocess_env, python_exe):
    out = subprocess.run([python_exe, "-m", "scd_train.envs"], env=subprocess_env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[0] == "crafter" and BREAKOUT in out and len(out) > 50
    actions = subprocess.run([python_exe, "-m", "scd_train.envs", "--actions", BREAKOUT], env=subprocess_env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
    assert "2\tRIGHT" in actions
    bad = subprocess.run([python_exe, "-m", "scd_train.envs", "--actions", "ALE/Nope-v5"], env=subprocess_env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown env 'ALE/Nope-v5'" in bad.stderr
