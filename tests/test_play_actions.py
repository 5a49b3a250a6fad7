"""scd-play without a model: action names and keys, scripts, page messages, which key drives a frame."""

import json

import pytest

from scd_train.config import load_config
from scd_train.errors import InputError
from scd_train.play.actions import ActionSet, assign_keys, build_action_set, idle_action, parse_script
from scd_train.play.controls import BadMessage, KeyState, parse_message


def _manifest(root, names):
    root.mkdir(parents=True)
    manifest = {"version": 1, "latent": {"shape": [8, 12, 8, 8], "dtype": "float16"}, "vae": {"id": "x"},
                "normalization": {"kind": "scaling_factor", "scaling_factor": 1.0},
                "actions": {"present": True, "num_classes": len(names), "names": names},
                "formats": {"webdataset": {"shards": []}}}
    (root / "manifest.json").write_text(json.dumps(manifest))


def _digits() -> ActionSet:
    return build_action_set(load_config("configs/tiny.yaml"))


def test_synthetic_runs_use_the_moving_digits_names_on_arrows_and_wasd():
    actions = _digits()
    assert actions.names == ("right", "left", "down", "up")
    keys = {k.name: k.keys for k in actions.keys}
    assert keys == {"right": ("ArrowRight", "d"), "left": ("ArrowLeft", "a"), "down": ("ArrowDown", "s"),
                    "up": ("ArrowUp", "w")}
    assert actions.idle is None and "null action" in actions.idle_label


def test_names_come_from_the_shard_manifest(tmp_path):
    _manifest(tmp_path / "shards", ["NOOP", "FIRE", "RIGHT", "LEFT"])
    cfg = load_config("configs/tiny_shards.yaml", [f"data.path={tmp_path / 'shards'}"])
    actions = build_action_set(cfg)
    assert actions.names == ("NOOP", "FIRE", "RIGHT", "LEFT")
    assert "manifest.json" in actions.source
    assert actions.idle == 0  # no key plays NOOP, not the null action
    keys = {k.name: k.keys for k in actions.keys}
    assert keys == {"FIRE": (" ",), "RIGHT": ("ArrowRight", "d"), "LEFT": ("ArrowLeft", "a")}


def test_without_recorded_names_actions_are_numbered(tmp_path):
    _manifest(tmp_path / "shards", [])
    cfg = load_config("configs/tiny_shards.yaml", [f"data.path={tmp_path / 'shards'}", "model.num_actions=3"])
    actions = build_action_set(cfg)
    assert actions.names == ("action 0", "action 1", "action 2")
    assert [k.keys for k in actions.keys] == [("1",), ("2",), ("3",)]


def test_a_manifest_that_names_fewer_actions_than_the_model_numbers_the_rest(tmp_path):
    _manifest(tmp_path / "shards", ["left", "right"])
    cfg = load_config("configs/tiny_shards.yaml", [f"data.path={tmp_path / 'shards'}"])
    assert build_action_set(cfg).names == ("left", "right", "action 2", "action 3")


def test_a_model_without_actions_has_no_keys():
    actions = build_action_set(load_config("configs/tiny.yaml", ["model.num_actions=0"]))
    assert actions.names == () and actions.keys == ()
    assert "no actions" in actions.idle_label


def test_every_action_gets_its_own_key_meaning_first():
    names = ("noop", "move_left", "move_right", "move_up", "move_down", "do", "sleep", "place_stone", "left")
    keys = {k.name: k.keys for k in assign_keys(names)}
    assert keys["move_left"] == ("ArrowLeft", "a") and keys["do"] == (" ",)
    assert "noop" not in keys and idle_action(names) == 0
    assert keys["left"] == ("3",)  # the arrow is taken by move_left; spares follow the number row
    every = [k for ks in keys.values() for k in ks]
    assert len(every) == len(set(every))


def test_scripts_expand_to_one_action_per_frame(tmp_path):
    actions = _digits()
    assert parse_script("right*3, down*2 idle 1 UP", actions) == [0, 0, 0, 2, 2, None, 1, 3]
    script = tmp_path / "moves.txt"
    script.write_text("left*2\nidle*2\n")
    assert parse_script(str(script), actions) == [1, 1, None, None]


@pytest.mark.parametrize("script, expected", [("jump*2", "'jump' is not an action of this model; its actions are "
                                                          "right, left, down, up"),
                                              ("right*x", r"repeat after '\*' must be an integer"),
                                              ("right*0", "at least 1"), (" , ", "empty")])
def test_bad_scripts_say_what_is_wrong(script, expected):
    with pytest.raises(InputError, match=expected):
        parse_script(script, _digits())


def test_page_messages_are_validated():
    assert parse_message('{"type": "press", "action": 2, "seq": 7}', 4).value == 2
    assert parse_message('{"type": "steps", "value": 4}', 4).value == 4
    assert parse_message('{"type": "rate", "fps": 0}', 4).value == 0.0
    assert parse_message('{"type": "pause", "on": true}', 4).value is True
    bad = {"not json": "not JSON", "[1, 2]": "not a JSON object", '{"type": "warp"}': "unknown message type",
           '{"type": "press", "action": 4}': r"valid actions: an integer in \[0, 3\]",
           '{"type": "press", "action": true}': "action=True", '{"type": "steps", "value": 0}': "from 1 to 1000",
           '{"type": "rate", "fps": 1000}': "fps=1000", '{"type": "pause", "on": 1}': "true or false",
           '{"type": "reset", "seq": "a"}': "not an integer"}
    for text, reason in bad.items():
        with pytest.raises(BadMessage, match=reason):
            parse_message(text, 4)
    with pytest.raises(BadMessage, match="none"):
        parse_message('{"type": "press", "action": 0}', 0)


def test_a_frame_uses_the_last_press_else_the_held_key_else_idle():
    keys = KeyState(idle=None)
    assert keys.take() == (None, None)
    keys.press(0, 1)
    assert keys.take() == (0, 1) and keys.take() == (0, 1)  # held: every frame
    keys.press(2, 2)
    keys.release(2)
    assert keys.take() == (2, 2)  # a tap between two ticks still drives one frame
    assert keys.take() == (0, 1)  # then the key still held
    keys.release(0)
    assert keys.take() == (None, None)
    noop = KeyState(idle=5)
    assert noop.take() == (5, None)
