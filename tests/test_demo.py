"""The demo trains from scratch in its own run directory: it empties one an earlier demo made and never
deletes anything else a dotted override points it at."""

from __future__ import annotations

import pytest

from scd_train import demo


def user_run(path):
    (path / "checkpoints" / "step_00000100").mkdir(parents=True)
    (path / "config.yaml").write_text("model: {}\n")
    (path / "metrics.jsonl").write_text('{"step": 100, "loss": 0.1}\n')
    return path


def test_a_new_directory_gets_the_demo_mark(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    demo.start_over(run_dir)
    assert [p.name for p in run_dir.iterdir()] == [demo.DEMO_MARK]


@pytest.mark.parametrize("left_behind", [demo.DEMO_MARK, demo.SUMMARY])
def test_a_directory_an_earlier_demo_made_is_emptied(tmp_path, left_behind):
    run_dir = user_run(tmp_path / "demo")
    (run_dir / left_behind).write_text("{}")
    demo.start_over(run_dir)
    assert [p.name for p in run_dir.iterdir()] == [demo.DEMO_MARK]


def test_a_run_the_demo_did_not_make_is_refused_and_kept(tmp_path, capsys):
    run_dir = user_run(tmp_path / "my-run")
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert demo.main(["--source", "synthetic", f"train.run_dir={run_dir}", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"scd-demo: train.run_dir={str(run_dir)!r} holds files the demo did not write")
    assert "checkpoints, config.yaml, metrics.jsonl" in err and "choose a new or empty train.run_dir" in err
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
