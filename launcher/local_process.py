"""The process a local job id names, and whether it is still that process.

A local job's id is the PID of submitit's controller. PIDs are reused: once the job has ended,
the same number can belong to anyone's editor or shell, and `sd35dist cancel` would stop it. So
`submit` records who the process is — its start time (clock ticks after boot, unique per PID),
its process group and its command line, read from /proc — and `status` and `cancel` act on the
PID only while all three still match. Linux only (so is the local scheduler).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

PROC = Path("/proc")


@dataclasses.dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_ticks: int
    """/proc/PID/stat field 22: when the process started, in clock ticks after boot."""
    pgid: int
    cmdline: tuple[str, ...]

    def to_record(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_ticks": self.start_ticks, "pgid": self.pgid, "cmdline": list(self.cmdline)}

    @classmethod
    def from_record(cls, raw: Any) -> ProcessIdentity:
        """The identity `to_record` wrote; ValueError for anything else."""
        if not isinstance(raw, dict):
            raise ValueError("process: expected an object")
        try:
            identity = cls(int(raw["pid"]), int(raw["start_ticks"]), int(raw["pgid"]),
                           tuple(str(arg) for arg in raw["cmdline"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"process: {err}") from None
        return identity


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; None when there is no such process."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return text.rsplit(")", 1)[1].split()


def read_identity(pid: int) -> ProcessIdentity | None:
    """Who PID is now; None when no process has it (or it is a zombie: it has ended)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return ProcessIdentity(pid, int(fields[19]), int(fields[2]), tuple(a.decode(errors="replace") for a in raw.split(b"\0")[:-1]))


def is_running(identity: ProcessIdentity) -> bool:
    """Whether the process `identity` names is still running (its PID not ended, nor reused)."""
    return read_identity(identity.pid) == identity


def alive(pid: int) -> bool:
    """Whether any process (not a zombie) holds PID."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every process below PID (children, their children …), parents first."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
