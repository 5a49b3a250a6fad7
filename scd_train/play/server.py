"""The play server: a Starlette app with one WebSocket player and the page in ``static/``.

One model per process and one player at a time: a second page that connects while someone is
playing is told so on the page and its socket is closed (the stream is never shared, so what one
person steers is never moved by another's keys). When the player's tab closes, its stream and KV
cache are dropped and the next page can play.

Model work never runs on the event loop: every call into the session (reset, tick, a change of
decoder steps, closing) goes to one worker thread, in order, so a frame in progress never sees its
settings change and the loop stays free to read keys and answer requests. One frame is generated
per tick at the target rate, under the last key pressed since the previous tick, else the key
still held, else the idle action.

Messages from the page (``controls``) that do not parse are logged, counted and ignored.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from scd_train.play.controls import BadMessage, Command, KeyState, parse_message
from scd_train.play.journal import Journal
from scd_train.play.recording import Recorder
from scd_train.play.session import PlayLimit, PlaySession, TickResult

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# Close code for a page refused because another one is playing (4000-4999: application codes).
CLOSE_BUSY = 4001


@dataclass
class ServerStats:
    connections: int = 0
    refused: int = 0
    ignored_messages: int = 0
    frames: int = 0
    recent_frames: collections.deque = field(default_factory=lambda: collections.deque(maxlen=240))

    def frames_per_second(self) -> float:
        now = time.perf_counter()
        recent = [t for t in self.recent_frames if now - t <= 1.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)


class PlayServer:
    """Owns the session (the model), the worker thread and the single player slot."""

    def __init__(self, session: PlaySession, fps: float = 20.0, record_dir: Path | None = None,
                 journal: Journal | None = None) -> None:
        self.session, self.fps = session, fps
        self.record_dir = Path(record_dir) if record_dir is not None else None
        self.journal = journal or Journal(None, session.actions)
        self.info = session.describe()
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scd-play-model")
        self.player: Player | None = None
        self.stats = ServerStats()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    async def run_model(self, fn, *args):
        """Run ``fn(*args)`` on the model thread (in submission order) without blocking the loop."""
        with self._in_flight_lock:
            self._in_flight += 1
        future = self.executor.submit(fn, *args)
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _finished(self, _future) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1

    @property
    def busy(self) -> bool:
        return self._in_flight > 0

    def status(self) -> dict:
        return {"player": self.player is not None, "stream_open": self.session.is_open, "busy": self.busy,
                "frames": self.stats.frames, "frames_per_second": round(self.stats.frames_per_second(), 2),
                "connections": self.stats.connections, "refused": self.stats.refused,
                "ignored_messages": self.stats.ignored_messages, "steps": self.session.steps,
                "fps_target": self.player.fps if self.player is not None else self.fps, "model": self.info}

    def ignored(self, reason: str) -> None:
        self.stats.ignored_messages += 1
        log.warning("ignored a malformed message from the page: %s", reason)
        self.journal.event("ignored", reason=reason)

    # -- HTTP and WebSocket endpoints ----------------------------------------------------------

    def app(self) -> Starlette:
        routes = [Route("/", self._index), Route("/api/status", self._status),
                  WebSocketRoute("/ws", self._websocket), Mount("/static", StaticFiles(directory=STATIC))]
        if self.record_dir is not None:
            routes.append(Mount("/recordings", StaticFiles(directory=self.record_dir, check_dir=False)))
        return Starlette(routes=routes)

    async def _index(self, request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    async def _status(self, request: Request) -> JSONResponse:
        return JSONResponse(self.status())

    async def _websocket(self, websocket: WebSocket) -> None:
        origin = websocket.headers.get("origin")
        if origin and urlparse(origin).netloc != websocket.headers.get("host"):
            # another site open in the same browser must not drive (or watch) the model
            log.warning("refused a WebSocket from origin %s (the page is served from %s)", origin,
                        websocket.headers.get("host"))
            await websocket.close(code=1008)
            return
        await websocket.accept()
        self.stats.connections += 1
        if self.player is not None:
            self.stats.refused += 1
            text = ("Someone is already playing this model in another tab or browser: scd-play serves one player "
                    "at a time. Close that tab (this page can then play after a reload), or start another "
                    "scd-play on a different --port.")
            log.info("refused a second page while a player is connected")
            self.journal.event("refused")
            await websocket.send_text(json.dumps({"type": "refused", "text": text}))
            await websocket.close(code=CLOSE_BUSY, reason="another page is playing")
            return
        self.player = Player(self, websocket)
        log.info("a player connected")
        self.journal.event("connect")
        try:
            await self.player.play()
        finally:
            await self.run_model(self.session.close)  # after any frame still in progress
            self.player = None
            log.info("the player left; the stream is closed")
            self.journal.event("disconnect")


class Player:
    """One connected page: reads its keys and commands, and streams frames to it."""

    def __init__(self, server: PlayServer, websocket: WebSocket) -> None:
        self.server, self.session, self.ws = server, server.session, websocket
        self.keys = KeyState(self.session.actions.idle)
        self.commands: asyncio.Queue[Command] = asyncio.Queue()
        self.wake = asyncio.Event()
        self.paused = False
        self.limited = False
        self.fps = server.fps
        self.recorder: Recorder | None = None

    async def play(self) -> None:
        hello = {"type": "hello", **self.server.info, "steps": self.session.steps, "fps_target": self.fps,
                 "recording": self.server.record_dir is not None}
        await self.ws.send_text(json.dumps(hello))
        reader = asyncio.create_task(self._read())
        ticker = asyncio.create_task(self._tick_loop())
        done, pending = await asyncio.wait({reader, ticker}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is None or isinstance(exc, (WebSocketDisconnect, OSError)) or reader in done:
                continue  # the page went away (a send can fail just before the close arrives)
            log.error("play session ended by an error: %s", exc, exc_info=exc)
            with contextlib.suppress(Exception):  # the socket may be gone already
                await self._notice("error", f"the server stopped this session: {exc}")

    async def _read(self) -> None:
        count = self.session.actions.count
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self.server.ignored("binary data (the page sends JSON text)")
                continue
            try:
                command = parse_message(text, count)
            except BadMessage as exc:
                self.server.ignored(f"{exc}: {text[:120]!r}")
                continue
            if command.kind == "press":
                self.keys.press(command.value, command.seq)
            elif command.kind == "release":
                self.keys.release(command.value)
            else:
                await self.commands.put(command)
                self.wake.set()

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        await self._send_frame(await self.server.run_model(self.session.reset), None)
        next_at = loop.time()
        while True:
            await self._apply_commands()
            if self.paused or self.limited:
                await self.wake.wait()
                self.wake.clear()
                next_at = loop.time()
                continue
            action, seq = self.keys.take()
            try:
                result = await self.server.run_model(self.session.tick, action)
            except PlayLimit as exc:
                self.limited = True
                await self._notice("limit", str(exc))
                await self._stop_recording()
                continue
            await self._send_frame(result, seq)
            next_at = self._pace(loop, next_at)
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def _pace(self, loop, next_at: float) -> float:
        if self.fps <= 0:
            return loop.time()
        # a late frame is not made up for by a burst: the schedule restarts from now
        return max(next_at + 1.0 / self.fps, loop.time())

    async def _apply_commands(self) -> None:
        while not self.commands.empty():
            command = self.commands.get_nowait()
            if command.kind == "pause":
                self.paused = command.value
                await self._state()
            elif command.kind == "reset":
                self.limited = False
                self.server.journal.event("reset")
                await self._send_frame(await self.server.run_model(self.session.reset), None)
            elif command.kind == "steps":
                await self.server.run_model(self.session.set_steps, command.value)
                await self._state()
            elif command.kind == "rate":
                self.fps = command.value
                await self._state()
            elif command.kind == "record":
                if command.value:
                    await self._start_recording()
                else:
                    await self._stop_recording()

    async def _send_frame(self, result: TickResult, press_seq: int | None) -> None:
        stats = self.server.stats
        if result.generated:
            stats.frames += 1
            stats.recent_frames.append(time.perf_counter())
        actions = self.session.actions
        header = {"type": "frame", "index": result.index, "generated": result.generated, "action": result.action,
                  "action_name": actions.name_of(result.action) if actions.names else "null",
                  "press_seq": press_seq, "steps": self.session.steps, "clip": result.clip,
                  "frames_left": self.session.frames_left, "tick_ms": 1000 * result.seconds,
                  "server_fps": stats.frames_per_second(),
                  "height": int(result.images[0].shape[0]), "width": int(result.images[0].shape[1]),
                  "panels": [{"label": p.label, **t.to_dict()} for p, t in zip(self.session.panels, result.timings)]}
        encoded = json.dumps(header).encode()
        payload = struct.pack(">I", len(encoded)) + encoded + b"".join(im.tobytes() for im in result.images)
        await self.ws.send_bytes(payload)
        self.server.journal.frame(result, self.session.steps, press_seq)
        log.debug("frame %d action %s press %s", result.index, header["action_name"], press_seq)
        if self.recorder is not None:
            self.recorder.add(result)
            if self.recorder.full:
                await self._stop_recording()

    async def _state(self) -> None:
        await self.ws.send_text(json.dumps({"type": "state", "paused": self.paused, "steps": self.session.steps,
                                            "fps_target": self.fps, "recording": self.recorder is not None}))

    async def _notice(self, kind: str, text: str) -> None:
        await self.ws.send_text(json.dumps({"type": "notice", "kind": kind, "text": text}))

    async def _start_recording(self) -> None:
        if self.server.record_dir is None:
            await self._notice("error", "recording is off: start scd-play with --record-dir DIR")
            return
        self.recorder = self.recorder or Recorder()
        await self._state()

    async def _stop_recording(self) -> None:
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return
        await self._state()
        if not recorder.frames:
            await self._notice("error", "nothing was recorded (no frame played while recording)")
            return
        name = time.strftime("play-%Y%m%d-%H%M%S") + f"-{len(recorder.frames)}f.mp4"
        fps = int(round(self.fps)) if self.fps > 0 else 20
        # encoding runs beside the model thread, so play goes on while the file is written
        path = await asyncio.to_thread(functools.partial(recorder.write, self.server.record_dir / name, fps))
        log.info("recorded %d frames to %s", len(recorder.frames), path)
        self.server.journal.event("recording", path=str(path), frames=len(recorder.frames))
        await self.ws.send_text(json.dumps({"type": "recording", "url": f"/recordings/{name}", "path": str(path),
                                            "frames": len(recorder.frames)}))
