"""`python -m sd35dist.jobs.torchrun ARGS…`: torchrun, ending a failed job with one line.

torchrun reports a failed worker by raising ChildFailedError out of its main: its own
traceback and a ~20-line table, after the ranks have already said what went wrong in one
line (rank_failure.py). This runs the same agent — torch.distributed.run's own argument
parser and run() — and sums the failure up instead as

    sd35dist: stopped: rank 1 on node7 exited with status 2

exiting with that rank's status (2 for a user's mistake) rather than torchrun's 1.
"""

from __future__ import annotations

import os
import sys

SEPARATE_STORE_PER_ATTEMPT = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def exit_status(exitcode: int) -> int:
    """A worker's exit code as a shell status: a signal N (negative code) becomes 128 + N."""
    if exitcode < 0:
        return 128 - exitcode
    return exitcode or 1


def failure_summary(rank: int, host: str, exitcode: int) -> str:
    how = f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with status {exitcode}"
    return f"sd35dist: stopped: rank {rank} on {host} {how}"


def main(argv: list[str] | None = None) -> int:
    import socket

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_restarts > 0:
        # A fresh rendezvous store per worker attempt, hosted by that attempt's rank 0: the agents'
        # shared store keeps a dead attempt's keys, and the per-attempt prefix that would hide them
        # cannot be agreed on across nodes (sd35dist/parallel/process_group.py attempt_store).
        # Only with restarts: at the end of a job, rank 0's store can go before its peers have
        # let go of it, which the agents log as a RendezvousConnectionError.
        os.environ.setdefault(SEPARATE_STORE_PER_ATTEMPT, "1")
    try:
        run(args)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        print(failure_summary(rank, socket.gethostname(), failure.exitcode), file=sys.stderr, flush=True)
        return exit_status(failure.exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
