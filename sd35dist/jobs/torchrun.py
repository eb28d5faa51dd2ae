"""`python -m sd35dist.jobs.torchrun ARGS…`: torchrun, ending a failed job with one line.

torchrun reports a failed worker by raising ChildFailedError out of its main: its own
traceback and a ~20-line table, after the ranks have already said what went wrong in one
line (rank_failure.py). This runs the same agent — torch.distributed.run's own argument
parser and run() — and sums the failure up instead as

    sd35dist: stopped: rank 1 on node7 exited with status 2

exiting with that rank's status (2 for a user's mistake) rather than torchrun's 1.

Restarts (`--max-restarts`, the profile's `launch.max_restarts`) are for crashes a restart
cures: a killed or OOM-killed rank, a lost device. A mistake (exit status 2: a bad recipe, a
missing model, a corrupt shard) would meet every attempt again, printing its line once per
attempt, so the agent whose rank reported one stops at once instead of restarting.

At the end of a multi-node job every agent closes the rendezvous in the c10d store that one
of them hosts. torchrun lets the host exit as soon as it has closed it, and an agent still
closing then logs a TCPStore traceback and "failed to shutdown the rendezvous … due to an
error of type RendezvousConnectionError" under a job that succeeded. The host here keeps the
store until every agent has said it is done (`rendezvous_outlives_its_agents`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sd35dist.jobs.warm_ranks import rank_module, ranks_forked_warm
from sd35dist.runtime.job_env import JobEnvironment
from sd35dist.runtime.run_files import MISTAKE_FILE

SEPARATE_STORE_PER_ATTEMPT = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
MISTAKE_EXIT = 2
"""A rank's exit status for a mistake the user has to fix (rank_failure.py): never restarted."""
AGENTS_DONE_KEY = "sd35dist/agents-done/"
AGENTS_DONE_WAIT_S = 30.0


def exit_status(exitcode: int) -> int:
    """A worker's exit code as a shell status: a signal N (negative code) becomes 128 + N."""
    if exitcode < 0:
        return 128 - exitcode
    return exitcode or 1


def restart_cures(exitcodes: list[int]) -> bool:
    """Whether restarting the workers can help after these local exit codes: not after a mistake."""
    return MISTAKE_EXIT not in exitcodes


def failure_summary(rank: int, host: str, exitcode: int, restarts: int = 0, max_restarts: int = 0) -> str:
    how = f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with status {exitcode}"
    line = f"sd35dist: stopped: rank {rank} on {host} {how}"
    if exitcode == MISTAKE_EXIT and max_restarts > 0:
        return f"{line} (a mistake: not restarted)"
    if restarts > 0:
        return f"{line} after {restarts} of {max_restarts} restarts inside the allocation"
    return line


@dataclass
class Restarts:
    """What this node's agent did with its restarts, for the summary line."""

    used: int = 0


@contextmanager
def restart_policy(restarts: Restarts) -> Iterator[None]:
    """torchrun's agent, made to stop instead of restarting after a mistake, counting its restarts.

    torch offers no hook for when to restart: torch.distributed.run builds its LocalElasticAgent
    by name inside launcher.api.launch_agent. For the length of this agent process's run that
    name is our subclass, which reads the local workers' exit codes before torch's loop decides
    and takes away the remaining restarts after a mistake (tests/test_restarts.py fails if a
    torch release renames what this relies on).
    """
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.agent.server.api import WorkerState

    torch_agent = launcher_api.LocalElasticAgent

    class NoRestartAfterMistake(torch_agent):  # type: ignore[misc,valid-type]
        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
                if not restart_cures([failure.exitcode for failure in result.failures.values()]):
                    self._remaining_restarts = 0
            return result

        def _restart_workers(self, worker_group):
            restarts.used = worker_group.spec.max_restarts - self._remaining_restarts
            return super()._restart_workers(worker_group)

    launcher_api.LocalElasticAgent = NoRestartAfterMistake
    try:
        yield
    finally:
        launcher_api.LocalElasticAgent = torch_agent


@dataclass
class Rendezvous:
    """Where this job's agents meet, as torchrun decides it (c10d backend, several nodes)."""

    host: str
    port: int
    run_id: str
    nodes: int
    hosted_here: bool


def multi_node_rendezvous(args) -> Rendezvous | None:  # torchrun's parsed arguments
    """The c10d rendezvous of a job across nodes; None for one node (standalone) or another backend."""
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname, parse_rendezvous_endpoint
    from torch.distributed.run import parse_min_max_nnodes

    if args.standalone or args.rdzv_backend != "c10d" or not args.rdzv_endpoint:
        return None
    _, nodes = parse_min_max_nnodes(args.nnodes)
    if nodes < 2:
        return None
    host, port = parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=29400)
    # torchrun's own test for which agent hosts the c10d store (c10d_rendezvous_backend._create_tcp_store).
    return Rendezvous(host, port, args.rdzv_id, nodes, _matches_machine_hostname(host))


@contextmanager
def rendezvous_outlives_its_agents(rendezvous: Rendezvous | None, wait_s: float = AGENTS_DONE_WAIT_S) -> Iterator[None]:
    """Around torchrun's run: after a job that succeeded, each agent says it is done in the rendezvous
    store, and the agent hosting that store waits for all of them (at most `wait_s`) before it exits.

    The host holds the store from before torchrun creates it: TCPStores of one process that are
    multi-tenant share one server per port, so torchrun's store is this one, kept alive after
    torchrun has let go of it. Two agents on one host (the test cluster) race for the port as they
    do in torchrun: the one that binds hosts, the other is a client.
    """
    import torch.distributed as dist

    if rendezvous is None:
        yield
        return
    held = None
    if rendezvous.hosted_here:
        try:
            held = dist.TCPStore(rendezvous.host, rendezvous.port, is_master=True, multi_tenant=True,
                                 wait_for_workers=False, timeout=timedelta(seconds=60))
        except (RuntimeError, ValueError):
            held = None  # another agent on this machine hosts it
    yield
    key = AGENTS_DONE_KEY + rendezvous.run_id
    try:
        store = held or dist.TCPStore(rendezvous.host, rendezvous.port, is_master=False,
                                      timeout=timedelta(seconds=5))
        done = store.add(key, 1)
        deadline = time.monotonic() + wait_s
        while held is not None and done < rendezvous.nodes and time.monotonic() < deadline:
            time.sleep(0.2)
            done = store.add(key, 0)
    except (RuntimeError, ValueError):
        pass  # the host has gone already: nothing left to keep


def leave_mistake_mark(env: Mapping[str, str] | None = None) -> None:
    """Tell the batch script that this job ended on a mistake (run_files.MISTAKE_FILE)."""
    run_dir = JobEnvironment.read(env).run_dir
    if run_dir:
        try:
            (Path(run_dir) / MISTAKE_FILE).touch()
        except OSError:
            pass  # the status is a courtesy; the one-line error is already in the log


def mistake_marked(env: Mapping[str, str] | None = None) -> bool:
    """Whether an agent of this job has already marked it as ended on a mistake (leave_mistake_mark)."""
    run_dir = JobEnvironment.read(env).run_dir
    return bool(run_dir) and (Path(run_dir) / MISTAKE_FILE).exists()


def argument_parser():
    """torchrun's own parser (torch.distributed.run), answering a usage mistake in one line."""
    from torch.distributed.run import get_args_parser

    from sd35dist.config.cli_args import one_line_errors

    parser = one_line_errors(get_args_parser())
    parser.prog = "sd35dist torchrun"
    return parser


def main(argv: list[str] | None = None) -> int:
    import socket

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import run

    args = argument_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_restarts > 0:
        # A fresh rendezvous store per worker attempt, hosted by that attempt's rank 0: the agents'
        # shared store keeps a dead attempt's keys, and the per-attempt prefix that would hide them
        # cannot be agreed on across nodes (sd35dist/parallel/process_group.py attempt_store).
        # Without restarts torchrun's default (the agent hosts the workers' store) is kept.
        os.environ.setdefault(SEPARATE_STORE_PER_ATTEMPT, "1")
    restarts = Restarts()
    rendezvous = multi_node_rendezvous(args)
    try:
        with (rendezvous_outlives_its_agents(rendezvous), restart_policy(restarts),
              ranks_forked_warm(rank_module(args))):
            run(args)
    except RendezvousConnectionError:
        if rendezvous is None or rendezvous.hosted_here:
            raise
        # The agent hosting the rendezvous store has ended the job (its ranks failed) while this one
        # still watched the rendezvous: torchrun's traceback here would hide the host's reason.
        mistake = mistake_marked()
        print(f"sd35dist: stopped: the job ended on {rendezvous.host}, which hosts its rendezvous"
              + (" (a mistake: not restarted)" if mistake else ""), file=sys.stderr, flush=True)
        return MISTAKE_EXIT if mistake else 1
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        if failure.exitcode == MISTAKE_EXIT:
            leave_mistake_mark()
        print(failure_summary(rank, socket.gethostname(), failure.exitcode, restarts.used, args.max_restarts),
              file=sys.stderr, flush=True)
        return exit_status(failure.exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
