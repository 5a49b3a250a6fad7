"""scd-data record: determinism across worker counts, a killed recording resumed, the action stored
for frame t checked against the emulator, early ends, bad policies and changed settings."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest

from data_prep.cli import main as cli_main
from data_prep.record import RecordError, RecordOptions, record
from scd_train.envs import episode_seed, make_env, resize_frame
from scd_train.video import read_mp4

BREAKOUT = "ALE/Breakout-v5"


def options(out, **overrides) -> RecordOptions:
    base = dict(episodes=3, holdout_episodes=1, frames=24, size=32, progress=False)
    base.update(overrides)
    return RecordOptions(BREAKOUT, out, **base)


def episode(out, split: str, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
    stem = out / split / f"episode-{index:06d}"
    meta = json.loads(stem.with_suffix(".json").read_text())
    return read_mp4(stem.with_suffix(".mp4")), np.load(f"{stem}.actions.npy"), meta


def test_recording_is_deterministic_across_worker_counts_and_splits_use_disjoint_seeds(tmp_path):
    one = record(options(tmp_path / "one", workers=1))
    two = record(options(tmp_path / "two", workers=2))
    assert one.recorded == two.recorded == 4 and one.frames == two.frames
    for split, index in (("train", 0), ("train", 2), ("holdout", 0)):
        frames, actions, meta = episode(tmp_path / "one", split, index)
        frames2, actions2, _ = episode(tmp_path / "two", split, index)
        assert frames.shape == (meta["frames"], 32, 32, 3)
        np.testing.assert_array_equal(frames, frames2)  # lossless video: bit-exact frames
        np.testing.assert_array_equal(actions, actions2)
        assert actions[0] == 0 and actions.dtype == np.int64 and set(actions[1:]) <= {0, 1, 2, 3}
    info = json.loads((tmp_path / "one" / "record.json").read_text())
    assert info["complete"] and info["actions"] == {"num_classes": 4, "names": ["NOOP", "FIRE", "RIGHT", "LEFT"]}
    assert info["settings"]["resize"] == "stretch" and info["settings"]["world"]["sticky_actions"] == 0.0
    train, held = info["splits"]["train"]["episode_seeds"], info["splits"]["holdout"]["episode_seeds"]
    assert train == [episode_seed(0, "train", i) for i in range(3)] and not set(train) & set(held)
    assert all(s % 2 == 0 for s in train) and all(s % 2 == 1 for s in held)
    # another seed gives other episodes
    record(options(tmp_path / "other", seed=1, episodes=1, holdout_episodes=0))
    assert not np.array_equal(episode(tmp_path / "other", "train", 0)[1], episode(tmp_path / "one", "train", 0)[1])


def test_the_action_stored_for_frame_t_is_the_one_that_produced_it_in_the_emulator(tmp_path):
    out = tmp_path / "rec"
    record(options(out, episodes=1, holdout_episodes=0, frames=60, size=48))
    frames, actions, meta = episode(out, "train", 0)
    env = make_env(BREAKOUT)
    first = env.reset(meta["env_seed"])
    np.testing.assert_array_equal(resize_frame(first, 48, "stretch"), frames[0])
    distinguishing = 0
    for t in range(1, len(frames)):
        state = env.snapshot()
        outcomes = {}
        for a in range(env.num_actions):  # what every action would have shown at frame t
            env.restore(state)
            outcomes[a] = resize_frame(env.step(a).frame, 48, "stretch")
        np.testing.assert_array_equal(outcomes[int(actions[t])], frames[t], err_msg=f"frame {t}")
        # a stream shifted by one step (action t+1 stored for frame t) would be caught here
        if t + 1 < len(actions) and not np.array_equal(outcomes[int(actions[t + 1])], frames[t]):
            distinguishing += 1
        env.restore(state)
        env.step(int(actions[t]))
    assert distinguishing >= 5


def test_killed_recording_resumes_to_the_same_episodes_and_never_leaves_a_half_video(tmp_path, subprocess_env,
                                                                                     python_exe):
    out = tmp_path / "rec"
    cmd = [python_exe, "-m", "data_prep", "record", "--env", BREAKOUT, "--episodes", "10", "--holdout-episodes", "1",
           "--frames", "60", "--size", "32", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len([v for v in (out / "train").glob("*.mp4") if ".tmp" not in v.name]) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = json.loads((out / "record.json").read_text())
    assert not partial["complete"]
    videos = sorted((out / "train").glob("episode-*.mp4"))
    assert 2 <= len([v for v in videos if ".tmp" not in v.name]) < 10
    for video in videos:
        if ".tmp" not in video.name:  # every finished name holds a whole episode
            assert len(read_mp4(video)) == json.loads(video.with_suffix(".json").read_text())["frames"]
    assert cli_main(cmd[3:]) == 0  # rerun in-process: finishes the rest
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    final = json.loads((out / "record.json").read_text())
    assert final["complete"] and final["splits"]["train"]["episodes"] == 10
    fresh = tmp_path / "fresh"
    record(options(fresh, episodes=10, holdout_episodes=1, frames=60, workers=2))
    for split, count in (("train", 10), ("holdout", 1)):
        for i in range(count):
            np.testing.assert_array_equal(episode(out, split, i)[0], episode(fresh, split, i)[0])
            np.testing.assert_array_equal(episode(out, split, i)[1], episode(fresh, split, i)[1])


def test_episodes_that_end_early_are_kept_and_counted_or_continued_when_asked(tmp_path):
    # a 16-frame skip makes Breakout's five lives run out within a few hundred steps
    short = record(options(tmp_path / "short", episodes=1, holdout_episodes=0, frames=300, frameskip=16))
    frames, actions, meta = episode(tmp_path / "short", "train", 0)
    assert short.short == 1 and meta["ended_at"] == len(frames) - 1 < 299 and len(actions) == len(frames)
    info = json.loads((tmp_path / "short" / "record.json").read_text())
    assert info["short_episodes"] == 1
    record(options(tmp_path / "cont", episodes=1, holdout_episodes=0, frames=300, frameskip=16, reset_on_end=True))
    frames, actions, meta = episode(tmp_path / "cont", "train", 0)
    assert len(frames) == 300 and meta["ended_at"] is None and meta["resets"]
    assert all(actions[t] == 0 for t in meta["resets"])  # no action led to a reset frame
    np.testing.assert_array_equal(frames[: meta["resets"][0]], episode(tmp_path / "short", "train", 0)[0])


def test_bad_policies_unknown_worlds_and_changed_settings_are_clear_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad_agent.py").write_text("def seven(frame):\n    return 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RecordError) as exc:
        record(options(tmp_path / "bad", policy="bad_agent:seven"))
    message = str(exc.value)
    assert "'bad_agent:seven' returned action 7 for frame 1" in message and "0..3" in message and "RIGHT" in message
    assert cli_main(["record", "--env", "ALE/Nope-v5", "--out", str(tmp_path / "x")]) == 2
    assert "unknown env 'ALE/Nope-v5'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    out = tmp_path / "rec"
    record(options(out, episodes=1, holdout_episodes=1))
    with pytest.raises(RecordError, match=r"other settings \(size: was 32, now 48"):
        record(options(out, episodes=1, holdout_episodes=1, size=48))
    with pytest.raises(RecordError, match="holds 1 episodes but this run records 0"):
        record(options(out, episodes=1, holdout_episodes=0))
    again = record(options(out, episodes=2, holdout_episodes=1))  # asking for more keeps what is there
    assert again.kept == 2 and again.recorded == 1
