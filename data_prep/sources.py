"""Where encode's input folders came from: a ``scd-data record`` recording, ``scd-data synth``, or
plain videos; and what that means for the shard manifest (action vocabulary, a ``source`` block).

A folder is described by the ``record.json`` or ``synth.json`` in it or in its parent (both tools
write ``out/train`` and ``out/holdout`` beside their JSON). Folders encoded together must agree on
the world and its action vocabulary: clips of two games in one set would give one action id two
meanings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scd_train.errors import InputError

RECORD_FILE = "record.json"
SYNTH_FILE = "synth.json"


class SourceError(InputError):
    """Input folders that cannot be encoded together, or a recording that is not finished."""


@dataclass(frozen=True)
class FolderSource:
    folder: Path
    kind: str  # "record", "synth" or "videos"
    info: dict  # the parsed record.json / synth.json ({} for plain videos)
    info_path: Path | None

    @property
    def action_names(self) -> list[str] | None:
        if self.kind == "record":
            return list(self.info["actions"]["names"])
        if self.kind == "synth":
            return list(self.info["action_names"])
        return None

    @property
    def world(self) -> str:
        if self.kind == "record":
            return self.info["env"]
        return "moving digits" if self.kind == "synth" else "plain videos"


@dataclass(frozen=True)
class Sources:
    folders: list[FolderSource]

    @property
    def kind(self) -> str:
        return self.folders[0].kind

    @property
    def action_names(self) -> list[str] | None:
        return self.folders[0].action_names

    @property
    def frame_size(self) -> int | None:
        """The side of the square frames a recording wrote (None for other sources)."""
        return self.folders[0].info["settings"]["size"] if self.kind == "record" else None

    def layout_key(self) -> list[str] | None:
        """What identifies the recordings' bytes, so shards of an older recording are never reused."""
        if self.kind != "record":
            return None
        return [f"{f.folder.name}:{f.info['settings_digest']}" for f in self.folders]

    def manifest_block(self) -> dict:
        """``manifest["source"]``: enough to replay the world the clips came from."""
        if self.kind == "videos":
            return {"kind": "videos", "folders": [str(f.folder) for f in self.folders]}
        if self.kind == "synth":
            first = self.folders[0].info
            return {"kind": "synth", "seed": first.get("seed"), "synthetic": first.get("synthetic"),
                    "folders": [str(f.folder) for f in self.folders]}
        first = self.folders[0].info
        settings = first["settings"]
        return {"kind": "record", "env": first["env"], "world": settings["world"], "size": settings["size"],
                "resize": settings["resize"], "policy": settings["policy"], "frames": settings["frames"],
                "reset_on_end": settings["reset_on_end"],
                "recordings": [{"folder": str(f.folder), "split": f.folder.name, "record": str(f.info_path),
                                "seed": f.info["settings"]["seed"], "settings_digest": f.info["settings_digest"],
                                "episodes": f.info["splits"][f.folder.name]["episodes"],
                                "episode_seeds": f.info["splits"][f.folder.name]["episode_seeds"]}
                               for f in self.folders]}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path} is not valid JSON ({exc})") from None


def describe_folder(folder: Path) -> FolderSource:
    folder = Path(folder)
    if (folder / RECORD_FILE).is_file():
        raise SourceError(f"{folder} is the root of a recording: encode {folder / 'train'} or "
                          f"{folder / 'holdout'}, never both at once (held-out episodes would become training clips)")
    parent_record = folder.parent / RECORD_FILE
    if parent_record.is_file():
        info = _read_json(parent_record)
        if not info.get("complete"):
            raise SourceError(f"the recording in {folder.parent} is incomplete ({parent_record} says complete: "
                              "false); run the same `scd-data record` command again to finish it")
        if folder.name not in info.get("splits", {}):
            raise SourceError(f"{folder} is not one of the splits {sorted(info.get('splits', {}))} that "
                              f"{parent_record} describes")
        return FolderSource(folder, "record", info, parent_record)
    for path in (folder / SYNTH_FILE, folder.parent / SYNTH_FILE):
        if path.is_file():
            return FolderSource(folder, "synth", _read_json(path), path)
    return FolderSource(folder, "videos", {}, None)


def describe_sources(folders: list[Path]) -> Sources:
    """Describe every folder and refuse combinations that would mix worlds or vocabularies."""
    described = [describe_folder(f) for f in folders]
    first = described[0]
    for other in described[1:]:
        if other.kind != first.kind or other.world != first.world:
            raise SourceError(f"{first.folder} holds {first.world} ({first.kind}) but {other.folder} holds "
                              f"{other.world} ({other.kind}); encode each world into its own shard set")
        if other.action_names != first.action_names:
            raise SourceError(f"{first.folder} and {other.folder} name their actions differently "
                              f"({first.action_names} vs {other.action_names}); one set needs one vocabulary")
        if first.kind == "record":
            for key in ("world", "size", "resize"):
                mine, theirs = first.info["settings"][key], other.info["settings"][key]
                if mine != theirs:
                    raise SourceError(f"{first.folder} was recorded with {key}={json.dumps(mine)} but "
                                      f"{other.folder} with {key}={json.dumps(theirs)}; record both the same way")
    return Sources(described)
