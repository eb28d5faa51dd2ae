"""A rank of tests/test_warm_ranks.py, run as `python -m tests.warm_rank_probe OUT [fail|die]`: records
what it found already imported at its first line and the garbage collector's state there, its parent,
its command line as `ps` shows it, its arguments and environment; then ends as asked."""

import gc
import sys

ALREADY_IMPORTED = {name: name in sys.modules for name in ("torch", "diffusers", "sd35dist.jobs.train", "deepspeed")}
GARBAGE_COLLECTOR = {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
                     "full_collections": gc.get_stats()[2]["collections"]}

import json  # noqa: E402  (after the look at sys.modules, which is this module's point)
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def main() -> int:
    out, *how = sys.argv[1:]
    rank = os.environ["RANK"]
    cmdline = command_line(os.getpid())
    parent_alive_after_sigterm = None
    if how == ["sigterm-parent"]:  # what scancel does to every process of a step, the fork server included
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(1)
        parent_alive_after_sigterm = Path(f"/proc/{os.getppid()}").exists()
    record = {"parent_cmdline": command_line(os.getppid()), "parent_alive_after_sigterm": parent_alive_after_sigterm,
              "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
              "already_imported": ALREADY_IMPORTED, "gc": GARBAGE_COLLECTOR, "parent": os.getppid(), "pid": os.getpid(), "cmdline": cmdline,
              "argv": sys.argv[1:], "name": __name__, "launch_variable": os.environ.get("WARM_PROBE_VARIABLE"),
              "omp_threads": os.environ.get("OMP_NUM_THREADS"), "world_size": os.environ["WORLD_SIZE"]}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    if rank == "1" and how == ["fail"]:
        print("error: the probe's mistake", file=sys.stderr)
        return 2
    if rank == "1" and how == ["raise"]:
        raise RuntimeError("a bug in the probe")
    if rank == "1" and how == ["die"]:
        print("last words before SIGKILL")  # no flush: a warm rank's stdout must be unbuffered, as with -u
        os.kill(os.getpid(), 9)
    return 0


if __name__ == "__main__":
    sys.exit(main())
