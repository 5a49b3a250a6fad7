"""A play session's record: one JSON line per generated frame and per event (connect, reset, ...).

Every line is flushed as it is written, so a crash or a killed server keeps what was played; the
``action`` column of the frame lines is a script that ``scd-play --script`` can replay.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TextIO

from scd_train.play.actions import ActionSet
from scd_train.play.session import TickResult


class Journal:
    def __init__(self, path: Path | None, actions: ActionSet) -> None:
        self.path, self.actions = path, actions
        self._file: TextIO | None = None
        self._lock = threading.Lock()  # frames are written from the event loop, events from anywhere
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # kept open for the session: one line per frame

    def frame(self, result: TickResult, steps: int, press_seq: int | None = None) -> None:
        record = {"frame": result.index, "generated": result.generated, "action": result.action,
                  "name": self.actions.name_of(result.action) if self.actions.names else "null",
                  "press_seq": press_seq, "steps": steps, "clip": result.clip, "tick_ms": 1000 * result.seconds,
                  "panels": [t.to_dict() for t in result.timings]}
        self._write(record)

    def event(self, kind: str, **fields: object) -> None:
        self._write({"event": kind, **fields})

    def _write(self, record: dict) -> None:
        if self._file is None:
            return
        line = json.dumps({"time": round(time.time(), 4), **record})
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
