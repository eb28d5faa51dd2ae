"""Every process's CPU while a command runs (`make test`, as root), by the test it served and by what it was.

    sudo python3 benchmarks/suite_cpu.py --out runs/suite-cpu -- make test
    python3 benchmarks/suite_cpu.py --report runs/suite-cpu      # the tables again

It needs only the standard library, so it runs from a clean clone before `make test` has made the venv.

Where a 2-core machine's time goes in the suite is a question of CPU, not of wall time (both cores are
busy), and most of it is spent in grandchildren that pytest never waits for: torchrun agents, their fork
servers, forked ranks, Slurm job steps. `/usr/bin/time make test` misses them; sampling /proc misses what
each process spends after the last sample. This turns on BSD process accounting (acct(2): the kernel
writes every process's user + system CPU when it exits, to 10 ms), and while the command runs it notes,
every half second, each new process's PYTEST_CURRENT_TEST and command line. A process whose test is not
known (it started and ended between two looks) takes its nearest known ancestor's; a Slurm job step's
processes count as "(Slurm job steps)" (slurmd's environment names the test that started the cluster).

Writes acct.bin and processes.json under --out, and prints: CPU by kind of process (agent, fork server,
rank, CLI, pytest worker, install, ...), by test file and the busiest tests. Needs root (acct(2)) and a
kernel with CONFIG_BSD_PROCESS_ACCT; stops accounting when the command ends, however it ends.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCT_V3 = struct.Struct("<BBHIIIIIIfHHHHHHHH16s")
"""struct acct_v3 (linux/acct.h): flag, version, tty, exitcode, uid, gid, pid, ppid, btime, etime, utime,
stime, mem, io, rw, minflt, majflt, swaps, comm."""
AHZ = 100
"""acct_v3's clock: times are comp_t counts of 1/AHZ s."""
SAMPLE_S = 0.5
SLURM_STEP = "slurmstepd"
SLURM_PROGRAMS = ("slurm", "srun", "sbatch", "squeue", "scontrol", "sacct", "scancel", "sinfo", "munge", "mariadb")
SLURM_JOBS = "(Slurm job steps)"


@dataclass(frozen=True)
class Exited:
    """One process as the kernel accounted it at its exit."""

    pid: int
    ppid: int
    comm: str
    cpu_s: float


@dataclass(frozen=True)
class Seen:
    """One process as the sampler saw it alive: its parent, test and command line."""

    ppid: int
    test: str | None
    cmdline: str


def comp_t_value(value: int) -> int:
    """acct's comp_t: a 13-bit mantissa and a 3-bit base-8 exponent."""
    return (value & 0x1FFF) << (3 * (value >> 13))


def parse_acct(data: bytes) -> list[Exited]:
    """The v3 records of an accounting file, in order."""
    records = []
    for offset in range(0, len(data) - ACCT_V3.size + 1, ACCT_V3.size):
        fields = ACCT_V3.unpack_from(data, offset)
        pid, ppid, utime, stime, comm = fields[6], fields[7], fields[10], fields[11], fields[-1]
        records.append(Exited(pid, ppid, comm.split(b"\0")[0].decode(errors="replace"),
                              (comp_t_value(utime) + comp_t_value(stime)) / AHZ))
    return records


def process_kind(cmdline: str, parent_cmdline: str) -> str:
    """What a process was, from its command line and its parent's (a rank is a fork of a fork server)."""
    if _fork_server(parent_cmdline):  # before its title is set a rank shows its fork server's command line
        return "rank"
    if cmdline.split(" ", 1)[0].rsplit("/", 1)[-1].startswith(SLURM_PROGRAMS):
        return "slurm"  # before "agent": srun's command line holds the job step's torchrun
    if _fork_server(cmdline):
        return "fork server"
    if "multiprocessing.resource_tracker" in cmdline:
        return "resource tracker"
    if " torchrun " in f" {cmdline} ":
        return "agent"
    if "exec(eval(sys.stdin.readline()))" in cmdline:
        return "pytest worker"
    if any(tool in cmdline for tool in (" -m pip ", "pip/__pip-runner__", " -m compileall ", " -m venv ", "ensurepip")):
        return "install"
    if " -m sd35dist" in cmdline or "/bin/sd35dist " in cmdline or "sd35dist/__main__.py" in cmdline:
        return "cli"
    if "python" in cmdline.split(" ", 1)[0]:
        return "python"
    return "other"


def _fork_server(cmdline: str) -> bool:
    return "multiprocessing.forkserver" in cmdline or "torchrun fork server" in cmdline


def attribute(exited: list[Exited], seen: dict[int, Seen]) -> list[tuple[Exited, str | None, str]]:
    """Each exited process with its test (its own, else its nearest known ancestor's) and its kind."""
    parents = {record.pid: record.ppid for record in exited}
    parents.update({pid: info.ppid for pid, info in seen.items()})

    def ancestry(pid: int) -> list[int]:
        line = [pid]
        while len(line) < 64 and parents.get(line[-1], 0) > 1:
            line.append(parents[line[-1]])
        return line

    def test_of(pid: int) -> str | None:
        line = [seen.get(ancestor) for ancestor in ancestry(pid)]
        if any(info is not None and info.cmdline.startswith(SLURM_STEP) for info in line):
            return SLURM_JOBS  # with the environment slurmd gives them: it names the test that started the cluster
        test = next((info.test for info in line if info is not None and info.test), None)
        return test.rsplit(" (", 1)[0] if test else None  # "... (call)": the phase is not the test

    def parent_cmdline(ppid: int) -> str:
        # A rank sampled before it set its title shows its fork server's: its own children (DeepSpeed's CPU
        # accelerator spawns `numactl --hardware` hundreds of times a run) are not ranks.
        parent = seen.get(ppid)
        if parent is None:
            return ""
        grandparent = seen.get(parent.ppid)
        return "" if grandparent is not None and _fork_server(grandparent.cmdline) else parent.cmdline

    out = []
    for record in exited:
        info = seen.get(record.pid)
        cmdline = info.cmdline if info else record.comm
        out.append((record, test_of(record.pid), process_kind(cmdline, parent_cmdline(info.ppid if info else record.ppid))))
    return out


def report(attributed: list[tuple[Exited, str | None, str]], busiest: int = 30) -> str:
    """Markdown tables: CPU by kind, by test file, and the busiest tests."""
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    by_file: collections.Counter[str] = collections.Counter()
    by_test: collections.Counter[str] = collections.Counter()
    for record, test, kind in attributed:
        by_kind[kind][0] += 1
        by_kind[kind][1] += record.cpu_s
        by_file[test.split("::", 1)[0] if test else "(no test: install, pytest itself, daemons)"] += record.cpu_s
        if test:
            by_test[test] += record.cpu_s
    total = sum(count_cpu[1] for count_cpu in by_kind.values())
    lines = [f"{len(attributed)} processes, {total:.0f} CPU-s", "", "| kind | processes | CPU-s | per process |",
             "|---|---|---|---|"]
    for kind in sorted(by_kind, key=lambda name: -by_kind[name][1]):
        count, cpu = by_kind[kind]
        lines.append(f"| {kind} | {count} | {cpu:.0f} | {cpu / count:.2f} |")
    lines += ["", "| test file | CPU-s |", "|---|---|"]
    lines += [f"| {name} | {cpu:.0f} |" for name, cpu in by_file.most_common()]
    lines += ["", "| test | CPU-s |", "|---|---|"]
    lines += [f"| {name} | {cpu:.1f} |" for name, cpu in by_test.most_common(busiest)]
    return "\n".join(lines)


def look(seen: dict[str, list], me: int) -> None:
    """Note every process not seen before (key pid:starttime): its parent, PYTEST_CURRENT_TEST, command line."""
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()
            key = f"{name}:{stat[19].decode()}"
            if key in seen:
                continue
            environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").strip()
        except (OSError, IndexError):
            continue  # gone, or a kernel thread
        test = next((entry[20:].decode(errors="replace") for entry in environ
                     if entry.startswith(b"PYTEST_CURRENT_TEST=")), None)
        seen[key] = [int(stat[1]), test, cmdline[:400].decode(errors="replace")]


def measure(command: list[str], out: Path) -> int:
    """Run `command` with accounting on, noting processes; its exit status. OSError (one line) when accounting
    cannot be turned on or the command cannot start, with nothing of an earlier run left under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    acct_file, seen_file = out / "acct.bin", out / "processes.json"
    seen_file.unlink(missing_ok=True)
    acct_file.write_bytes(b"")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.acct(str(acct_file).encode()) != 0:
        raise OSError(f"acct({acct_file}): {os.strerror(ctypes.get_errno())} (needs root and BSD process accounting)")
    seen: dict[str, list] = {}
    try:
        child = subprocess.Popen(command)
        while child.poll() is None:
            look(seen, os.getpid())
            time.sleep(SAMPLE_S)
    finally:
        libc.acct(None)
    seen_file.write_text(json.dumps(seen))
    return child.returncode


def load(out: Path) -> list[tuple[Exited, str | None, str]]:
    seen = {int(key.split(":")[0]): Seen(*value) for key, value in json.loads((out / "processes.json").read_text()).items()}
    return attribute(parse_acct((out / "acct.bin").read_bytes()), seen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where acct.bin and processes.json go")
    parser.add_argument("--report", type=Path, help="print the tables of an earlier --out, run nothing")
    parser.add_argument("command", nargs="*", help="the command to run (after --)")
    args = parser.parse_args(argv)
    if args.report:
        print(report(load(args.report)))
        return 0
    if not args.out or not args.command:
        parser.error("give --out DIR -- COMMAND, or --report DIR")
    try:
        status = measure(args.command, args.out)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report(load(args.out)))
    return status


if __name__ == "__main__":
    sys.exit(main())
