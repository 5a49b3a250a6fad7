"""scd-play end to end: a tiny model trained here, the session, scripted play, and the page in a real
browser (Debian's chromium driven by Playwright) against a server process on a free local port."""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from scd_train import train
from scd_train.play import cli
from scd_train.play.session import PlayLimit, PlayOptions, PlaySession
from scd_train.video import read_mp4

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "play"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
SMALL = ["model.width=64", "model.num_heads=2", "model.head_dim=32", "model.rope_axes=[8,12,12]",
         "model.encoder_layers=1", "model.decoder_layers=1", "model.layers=2", "data.synthetic.num_videos=16",
         "data.synthetic.frames_per_video=8", "data.clip_frames=4", "data.batch_size=4", "train.steps=2",
         "log.progress_bar=false", "log.wandb=disabled"]
NO_ACTIONS_MAX_FRAMES = 12
CONTEXT = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Four tiny runs trained for two steps (plumbing, not quality): SCD with the four digit actions,
    SCD without actions (and a short max_frames), the dense baseline, and SCD with an encoder window
    (and the same short max_frames)."""
    root = tmp_path_factory.mktemp("play-runs")
    variants = {"scd": [], "no_actions": ["model.num_actions=0", f"model.max_frames={NO_ACTIONS_MAX_FRAMES}"],
                "dense": ["model.arch=causal_dit"],
                "windowed": ["model.encoder_window=2", "model.encoder_sink_frames=1",
                             f"model.max_frames={NO_ACTIONS_MAX_FRAMES}"]}
    for name, extra in variants.items():
        assert train.main(["--config", "configs/tiny.yaml", *SMALL, *extra, f"train.run_dir={root / name}"]) == 0
    return {name: root / name for name in variants}


# -- the session and scripted play --------------------------------------------------------------


def test_steps_change_between_frames_and_each_frame_reports_its_encoder_and_decoder_time(runs):
    session = PlaySession(runs["scd"], PlayOptions(steps=1, context_frames=CONTEXT))
    first = session.reset()
    assert not first.generated and first.index == CONTEXT - 1
    stream = session.panels[0].stream
    frame = session.tick(0)
    assert stream.counts.denoise == 1 and frame.index == CONTEXT and frame.action == 0
    session.set_steps(3)
    frame = session.tick(None)
    assert stream.counts.denoise == 4 and stream.counts.context == 2
    timing = frame.timings[0]
    assert timing.encoder > 0 and timing.decoder > 0 and timing.render > 0
    assert timing.encoder + timing.decoder + timing.render <= frame.seconds
    assert frame.images[0].shape == (16, 16, 3) and frame.images[0].dtype.name == "uint8"
    session.close()
    assert not session.is_open


def test_a_run_without_an_encoder_window_stops_at_max_frames_until_reset(runs):
    session = PlaySession(runs["no_actions"], PlayOptions(steps=1, context_frames=CONTEXT))
    assert not session.endless and session.actions.names == ()
    session.reset()
    played = [session.tick(None) for _ in range(NO_ACTIONS_MAX_FRAMES - CONTEXT)]
    assert [f.index for f in played] == list(range(CONTEXT, NO_ACTIONS_MAX_FRAMES))
    assert all(f.action is None for f in played) and session.frames_left == 0
    with pytest.raises(PlayLimit, match=rf"model.max_frames={NO_ACTIONS_MAX_FRAMES}.*model.encoder_window=N"):
        session.tick(None)
    session.reset()
    assert session.tick(None).index == CONTEXT


def test_a_windowed_run_plays_past_max_frames_at_constant_cache_memory(runs, tmp_path, capsys):
    session = PlaySession(runs["windowed"], PlayOptions(steps=1, context_frames=CONTEXT))
    assert session.endless and session.frames_left is None
    session.reset()
    session.tick(0)  # the cache takes its storage at the first write
    cache = session.panels[0].stream.cache
    storage = [(t.data_ptr(), t.numel()) for t in (cache.keys, cache.values)]
    played = [session.tick(i % 4) for i in range(3 * NO_ACTIONS_MAX_FRAMES)]
    assert played[-1].index == CONTEXT + 3 * NO_ACTIONS_MAX_FRAMES > NO_ACTIONS_MAX_FRAMES
    assert session.panels[0].stream.cache is cache  # the ring is overwritten in place, never reallocated
    assert [(t.data_ptr(), t.numel()) for t in (cache.keys, cache.values)] == storage
    session.close()
    out = tmp_path / "long.mp4"
    assert cli.main([str(runs["windowed"]), "--script", f"idle*{2 * NO_ACTIONS_MAX_FRAMES}", "--steps", "1",
                     "--out", str(out)]) == 0
    assert len(read_mp4(out)) == 1 + 2 * NO_ACTIONS_MAX_FRAMES
    assert f"{2 * NO_ACTIONS_MAX_FRAMES} frames" in capsys.readouterr().out


def test_script_plays_through_the_session_tick_and_writes_the_video(runs, tmp_path, capsys):
    out, log = tmp_path / "play.mp4", tmp_path / "play.jsonl"
    args = [str(runs["scd"]), "--script", "right*3,down*2,idle", "--steps", "1", "--out", str(out), "--log", str(log)]
    assert cli.main(args) == 0
    assert "6 frames" in capsys.readouterr().out
    frames = read_mp4(out)
    assert len(frames) == 1 + 6  # the last context frame, then one per scripted action
    assert frames.shape[1] >= 128  # 16 px frames are enlarged to be watchable
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["action"] for r in lines if r["generated"]] == [0, 0, 0, 2, 2, None]
    assert [r["name"] for r in lines if r["generated"]][:4] == ["right"] * 3 + ["down"]


def test_context_from_picks_the_held_out_clip_and_names_the_choices_when_wrong(runs, tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    key = "synthetic-000015/000000"  # the last of the 16 tiny videos is held out
    args = [str(runs["scd"]), "--script", "up", "--steps", "1", "--out", str(tmp_path / "a.mp4"), "--log", str(log)]
    assert cli.main([*args, "--context-from", key]) == 0
    assert {json.loads(line)["clip"] for line in log.read_text().splitlines()} == {key}
    assert cli.main([*args, "--context-from", "synthetic-999999/000000"]) == 2
    err = capsys.readouterr().err
    assert "--context-from 'synthetic-999999/000000' is neither a held-out clip key" in err and key in err


def test_script_with_the_dense_baseline_plays_both_side_by_side(runs, tmp_path):
    out, log = tmp_path / "both.gif", tmp_path / "both.jsonl"
    args = [str(runs["scd"]), "--baseline", str(runs["dense"]), "--script", "left*2", "--steps", "1",
            "--out", str(out), "--log", str(log)]
    assert cli.main(args) == 0
    from PIL import Image

    with Image.open(out) as gif:
        assert gif.n_frames == 3 and gif.width > 2 * gif.height
    generated = [json.loads(line) for line in log.read_text().splitlines()][1:]
    assert all(len(r["panels"]) == 2 and r["panels"][1]["decoder_ms"] > 0 for r in generated)


def test_a_script_longer_than_a_windowless_run_can_play_is_refused(runs, tmp_path, capsys):
    assert cli.main([str(runs["no_actions"]), "--script", "idle*20", "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "24 in all" in err and f"model.max_frames={NO_ACTIONS_MAX_FRAMES}" in err and "model.encoder_window" in err
    assert not (tmp_path / "x.mp4").exists()


def test_a_run_directory_without_weights_is_a_clear_error(runs, tmp_path, capsys):
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(runs["scd"] / "config.yaml", empty / "config.yaml")
    assert cli.main([str(empty), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{empty} has no weights to play" in err and "no complete checkpoint" in err
    assert cli.main([str(tmp_path / "nowhere"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_port_in_use_is_a_clear_error(runs, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main([str(runs["scd"]), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err


def test_serving_beyond_this_machine_needs_an_explicit_flag(runs, capsys):
    assert cli.main([str(runs["scd"]), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


# -- the page in a real browser -------------------------------------------------------------------


class Server:
    """``python -m scd_train.play`` in its own process, on a free port it picks itself (--port 0)."""

    def __init__(self, run: Path, workdir: Path, *extra: str) -> None:
        self.log = workdir / "frames.jsonl"
        self.stderr_path = workdir / "server.stderr"
        self.record_dir = workdir / "recordings"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "scd_train.play", str(run), "--port", "0", "--threads", "1",
                   "--log", str(self.log), "--record-dir", str(self.record_dir), *extra]
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env,
                                     cwd=REPO)
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The address the server printed, once it is ready (servers started together load in parallel)."""
        if self._url is None:
            self._url = self._address(timeout=180)
        return self._url

    def _address(self, timeout: float) -> str:
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if selector.select(timeout=1.0):
                line = self.proc.stdout.readline()
                found = re.search(r"http://127\.0\.0\.1:\d+/", line)
                if found:
                    return found.group(0)
                if not line:
                    break
        self.stop()
        raise AssertionError(f"scd-play did not start: {self.stderr_path.read_text()[-2000:]}")

    def status(self) -> dict:
        return httpx.get(self.url + "api/status", timeout=30).json()

    def frames(self) -> list[dict]:
        """The frames the server logged for its latest player."""
        lines = [json.loads(line) for line in self.log.read_text().splitlines()]
        last_connect = max(i for i, r in enumerate(lines) if r.get("event") == "connect")
        return [r for r in lines[last_connect:] if "frame" in r]

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def wait_until(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def servers(runs, tmp_path_factory):
    """Both servers start at once, so their start-ups overlap."""
    running = {
        # the dense baseline plays beside the model, so every page test also covers the second panel
        "scd": Server(runs["scd"], tmp_path_factory.mktemp("play-server"), "--steps", "1", "--fps", "12",
                      "--baseline", str(runs["dense"])),
        "no_actions": Server(runs["no_actions"], tmp_path_factory.mktemp("play-server-no-actions"), "--steps", "1",
                             "--fps", "30"),
    }
    yield running
    for server in running.values():
        server.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["scd"]


@contextlib.contextmanager
def open_page(browser, server: Server, wait_for_frames: int = 2):
    page = browser.new_page()
    try:
        page.goto(server.url)
        if wait_for_frames:
            page.wait_for_function(f"window.scdPlay.stats.generated >= {wait_for_frames}", timeout=60_000)
        yield page
    finally:
        if not page.is_closed():
            page.close()
        wait_until(lambda: not server.status()["player"], what="the server to see the tab close")


def hold(page, key: str, action: int, frames: int = 3) -> None:
    """Hold ``key`` until ``frames`` frames generated under ``action`` have arrived."""
    page.keyboard.down(key)
    page.wait_for_function(f"window.scdPlay.stats.lastHeader.action === {action}", timeout=30_000)
    start = page.evaluate("window.scdPlay.stats.generated")
    page.wait_for_function(f"window.scdPlay.stats.generated >= {start + frames}", timeout=30_000)
    page.keyboard.up(key)


@pytest.mark.slow
def test_page_plays_keys_reach_the_model_frames_change_and_speed_is_shown(server, browser):
    with open_page(browser, server) as page:
        assert page.inner_text("#keys").split() == ["→", "/", "D", "right", "←", "/", "A", "left", "↓", "/", "S",
                                                    "down", "↑", "/", "W", "up"]
        hold(page, "ArrowRight", action=0)
        hold(page, "s", action=2)
        page.wait_for_function("window.scdPlay.stats.lastHeader.action === null", timeout=30_000)
        stats = page.evaluate("window.scdPlay.stats")
        assert len(set(stats["checksums"])) > 3  # frames change
        page.wait_for_function("document.getElementById('fps').textContent !== '–'", timeout=30_000)
        assert float(page.inner_text("#fps")) > 0
        readout = page.inner_text("#ms")
        assert re.search(r"encoder \d+\.\d ms \+ decoder \d+\.\d ms \(1 step\)", readout), readout
        assert re.search(r"SCD: \d+\.\d ms/frame .* dense baseline: \d+\.\d ms/frame", page.inner_text("#panel-ms"))
        assert page.locator("figcaption").all_inner_texts() == ["SCD", "dense baseline"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = page.screenshot(path=str(ARTIFACTS / "page.png"))
        print(f"screenshot: {ARTIFACTS / 'page.png'}")
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    # the server logged, frame by frame, the actions of the keys pressed (seq 1: right, seq 3: down)
    by_press = {}
    for record in server.frames():
        if record["generated"]:
            by_press.setdefault(record["press_seq"], set()).add((record["action"], record["name"]))
    assert by_press[1] == {(0, "right")} and by_press[3] == {(2, "down")}
    assert by_press[None] == {(None, "null")}  # no key held: the null action


@pytest.mark.slow
def test_pause_stops_frames_resume_restarts_them_reset_takes_a_new_context_and_record_saves(server, browser):
    with open_page(browser, server) as page:
        clip = page.evaluate("window.scdPlay.stats.lastHeader.clip")
        page.click("#record")
        page.wait_for_function("window.scdPlay.recording === true")
        start = page.evaluate("window.scdPlay.stats.generated")
        page.wait_for_function(f"window.scdPlay.stats.generated >= {start + 3}", timeout=30_000)
        page.click("#record")
        link = page.wait_for_selector("#recordings a", timeout=30_000)
        video = httpx.get(server.url.rstrip("/") + link.get_attribute("href"), timeout=30)
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"  # an mp4

        page.click("#pause")
        page.wait_for_function("window.scdPlay.paused === true")
        assert page.inner_text("#pause") == "Resume"
        paused_at = page.evaluate("window.scdPlay.stats.generated")
        time.sleep(1.0)  # about 12 ticks at the target rate
        assert page.evaluate("window.scdPlay.stats.generated") == paused_at
        page.click("#pause")
        page.wait_for_function(f"window.scdPlay.stats.generated > {paused_at}", timeout=30_000)

        page.click("#reset")
        page.wait_for_function(f"window.scdPlay.stats.lastHeader.clip !== {json.dumps(clip)} && "
                               "window.scdPlay.stats.lastHeader.generated", timeout=30_000)
        new = [h for h in page.evaluate("window.scdPlay.stats.headers") if h["clip"] != clip]
        assert (new[0]["index"], new[0]["generated"]) == (CONTEXT - 1, False)  # the new context's last frame
        assert (new[1]["index"], new[1]["generated"]) == (CONTEXT, True)  # then play goes on from it


@pytest.mark.slow
def test_steps_and_rate_change_live_while_the_server_keeps_answering(server, browser):
    with open_page(browser, server) as page:
        page.fill("#steps", "100")
        page.dispatch_event("#steps", "change")
        page.wait_for_function("window.scdPlay.stats.lastHeader.steps === 100", timeout=60_000)
        # a 100-step frame is in progress on the model thread; the event loop still answers
        status = wait_until(lambda: (s := server.status())["busy"] and s["steps"] == 100 and s, what="a busy status")
        assert status["player"] and status["stream_open"]
        page.fill("#steps", "1")
        page.dispatch_event("#steps", "change")
        page.wait_for_function("window.scdPlay.stats.lastHeader.steps === 1", timeout=60_000)
        page.select_option("#rate", "30")  # the target rate changes live too
        wait_until(lambda: server.status()["fps_target"] == 30, what="the new target rate")


@pytest.mark.slow
def test_a_second_page_is_refused_and_a_closed_tab_frees_the_stream(server, browser):
    first = browser.new_page()
    first.goto(server.url)
    first.wait_for_function("window.scdPlay.stats.generated >= 2", timeout=60_000)
    refused_before = server.status()["refused"]
    with open_page(browser, server, wait_for_frames=0) as second:
        second.wait_for_selector("#notice.refused", timeout=30_000)
        assert "already playing" in second.inner_text("#notice")
        assert server.status()["refused"] == refused_before + 1
        first.close()
        status = wait_until(lambda: (s := server.status())["player"] is False and s, what="the stream to be freed")
        assert status["stream_open"] is False
        second.reload()
        second.wait_for_function("window.scdPlay.stats.generated >= 2", timeout=60_000)
        assert server.status()["player"] is True


@pytest.mark.slow
def test_malformed_websocket_messages_are_ignored_and_logged(server, browser):
    with open_page(browser, server) as page:
        ignored_before = server.status()["ignored_messages"]
        page.evaluate("""() => {
            const socket = window.scdPlay.socket;
            for (const text of ['not json', '[1, 2]', '{"type": "warp"}', '{"type": "press", "action": 99}',
                                '{"type": "steps", "value": 0}']) socket.send(text);
            socket.send(new Uint8Array([1, 2, 3]).buffer);
        }""")
        wait_until(lambda: server.status()["ignored_messages"] == ignored_before + 6, what="six ignored messages")
        start = page.evaluate("window.scdPlay.stats.generated")
        page.wait_for_function(f"window.scdPlay.stats.generated >= {start + 3}", timeout=30_000)
    log = server.stderr()
    for reason in ("not JSON", "not a JSON object", "unknown message type 'warp'", "press: action=99", "steps: value=0",
                   "binary data"):
        assert f"ignored a malformed message from the page: {reason}" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_model_without_actions_plays_the_null_action_says_so_and_stops_at_max_frames(servers, browser):
    server = servers["no_actions"]
    with open_page(browser, server, wait_for_frames=1) as page:
        assert page.is_visible("#no-actions")
        notices = page.evaluate("window.scdPlay.stats.notices")
        assert any("null action only" in n["text"] for n in notices)
        page.keyboard.press("ArrowRight")
        page.wait_for_selector("#notice:has-text('model.encoder_window')", timeout=60_000)
        assert f"model.max_frames={NO_ACTIONS_MAX_FRAMES}" in page.inner_text("#notice")
        assert page.evaluate("window.scdPlay.stats.lastHeader.frames_left") == 0
        # the frames after the reset are told apart by emptying the page's header log first; waiting on
        # lastHeader alone races the page's polling, which can miss a frame that is soon replaced
        page.evaluate("window.scdPlay.stats.headers.length = 0")
        page.click("#reset")
        page.wait_for_function(f"window.scdPlay.stats.headers.some(h => h.generated && h.index === {CONTEXT})",
                               timeout=60_000)
        after_reset = page.evaluate("window.scdPlay.stats.headers")
        assert (after_reset[0]["index"], after_reset[0]["generated"]) == (CONTEXT - 1, False)
    records = server.frames()
    assert {r["action"] for r in records if r["generated"]} == {None}
    assert max(r["frame"] for r in records) == NO_ACTIONS_MAX_FRAMES - 1


@pytest.mark.slow
def test_a_websocket_from_another_site_is_refused(server):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = server.url.replace("http://", "ws://") + "ws"
    with pytest.raises(InvalidStatus, match="403"), connect(url, origin="http://elsewhere.example", open_timeout=30):
        pass
    wait_until(lambda: not server.status()["player"], what="no player")
    with connect(url, origin=server.url.rstrip("/"), open_timeout=30) as ws:  # the page's own origin plays
        assert json.loads(ws.recv(timeout=30))["type"] == "hello"
