"""SLURM's compact list syntax: node lists (``gpu[01-03,07],cpu1``) and task counts (``8(x2),4``)."""

from __future__ import annotations

import re

_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"node list {text!r}: unbalanced ']'")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError(f"node list {text!r}: unbalanced '['")
    parts.append("".join(current))
    return parts


def _expand_range(spec: str, whole: str) -> list[str]:
    """``01-03,07`` -> ['01', '02', '03', '07'], keeping the zero padding of the lower bound."""
    values = []
    for item in spec.split(","):
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"node list {whole!r}: cannot read range {item!r} (expected N or N-M)")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"node list {whole!r}: range {item!r} runs backwards")
        width = len(low)
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return values


def _expand_name(name: str, whole: str) -> list[str]:
    match = _BRACKET.search(name)
    if match is None:
        return [name]
    head, tail = name[: match.start()], name[match.end():]
    # Several bracket groups in one name (rack[1-2]-gpu[1-4]) form a product, first group slowest.
    return [head + value + rest for value in _expand_range(match.group(1), whole)
            for rest in _expand_name(tail, whole)]


def expand_hostlist(text: str) -> list[str]:
    """Host names of a SLURM node list, in order: ``gpu[01-03,07]`` -> gpu01 gpu02 gpu03 gpu07."""
    text = text.strip()
    if not text:
        raise ValueError("node list is empty")
    hosts: list[str] = []
    for part in _split_top_level(text):
        if not part:
            raise ValueError(f"node list {text!r}: empty entry")
        hosts.extend(_expand_name(part, text))
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """Tasks on each node from SLURM's ``SLURM_STEP_TASKS_PER_NODE`` syntax: ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in text.strip().split(","):
        match = _TASKS_ITEM.match(item.strip())
        if match is None:
            raise ValueError(f"tasks-per-node list {text!r}: cannot read {item!r} (expected N or N(xM))")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts
