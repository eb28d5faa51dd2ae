"""Ranks forked from one interpreter per node that has already imported the job's libraries.

Every rank of a job used to start as its own `python -u -m sd35dist train …` and import torch,
diffusers, transformers and peft before its first line of work: ~8 s of CPU per rank on a small
machine, and on a cluster node eight ranks reading the same thousands of files from a shared
filesystem at once, again after every restart. Under `sd35dist torchrun --start-method=forkserver
… -m MODULE ARGS` (what job scripts run unless the profile sets `launch.warm_ranks: false`) the
node's agent instead starts multiprocessing's fork server once, which imports those libraries
(PRELOAD) once; each rank, and each restarted rank, is a fork of it that runs MODULE as
`python -m` would (argv, `__main__`, exit status, unbuffered output, exit handlers).

torchrun's own agent does the rest unchanged (rendezvous, the ranks' environment, restarts,
signals): a module is handed to it as a function entrypoint, which torchrun starts with the
`--start-method` it was given (for a script or module torchrun otherwise ignores that option).
`--start-method=spawn` (or `fork`) keeps one fresh interpreter per rank.

CUDA cannot be used in a child forked after CUDA was initialised, so the fork server must not touch
it while importing: PYTORCH_NVML_BASED_CUDA_CHECK=1 makes torch.cuda.is_available() (which torchao
calls at import) ask NVML instead of initialising CUDA; a rank that nonetheless finds CUDA initialised
stops with one line naming the setting that avoids the fork server.
"""

from __future__ import annotations

import atexit
import gc
import io
import logging
import multiprocessing
import os
import runpy
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sd35dist.config.commands import WARM_START_METHOD

WORKER_LOG = "torch.distributed.elastic.multiprocessing.api"
"""torchrun's logger of worker failures: for a function worker it adds the agent's own traceback
(ProcessExitedException) to the line it logs for a script's worker."""
NVML_CUDA_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
FORK_SERVER_BEGIN = "sd35dist.jobs.warm_fork_server_begin"
FORK_SERVER_SETUP = "sd35dist.jobs.warm_fork_server"
PRELOAD = (
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "diffusers.models.transformers.transformer_sd3",
    "diffusers.models.autoencoders.autoencoder_kl",
    "sd35dist.cli",
    "sd35dist.jobs.train",
    "sd35dist.jobs.cache",
)
"""The libraries the fork server imports before the first rank: what every job imports, and the job
modules themselves (their heavy imports are mostly inside functions). DeepSpeed is left out: it picks
its accelerator, which may look at CUDA, when imported."""
JOB_PRELOAD = {
    "preflight": ("torch", "torch.distributed", "fsspec", "sd35dist.cli", "sd35dist.jobs.preflight"),
}
"""`sd35dist JOB` whose ranks import less than PRELOAD: preflight reads no model, and diffusers' import
(with the peft, transformers and torchao it pulls in) was half of its fork server's 9 CPU-s."""


@dataclass(frozen=True)
class RankModule:
    """The `-m MODULE ARGS` every rank runs."""

    module: str
    argv: tuple[str, ...]

    def preload(self) -> list[str]:
        """What the fork server imports, in order: first the garbage collector off for the imports
        (warm_fork_server_begin); the job's own libraries (JOB_PRELOAD) for `-m sd35dist JOB`, else
        PRELOAD; last, its own setup (warm_fork_server: SIGTERM, title, gc frozen and on again). Not the
        module itself: importing it would run a script's top level in the fork server."""
        job = self.argv[0] if self.module == "sd35dist" and self.argv else None
        return [FORK_SERVER_BEGIN, *JOB_PRELOAD.get(job, PRELOAD), FORK_SERVER_SETUP]


def rank_module(args) -> RankModule | None:  # torchrun's parsed arguments
    """The module the ranks run when torchrun was asked for warm ranks (`-m MODULE` and
    `--start-method=forkserver`); None for a script, `--no-python`, `--run-path` or another method."""
    if args.start_method != WARM_START_METHOD or not args.module or args.no_python or args.run_path:
        return None
    return RankModule(args.training_script, tuple(args.training_script_args))


@contextmanager
def ranks_forked_warm(rank: RankModule | None) -> Iterator[None]:
    """For the length of torchrun's run: the ranks are `run_module_as_rank(MODULE, *ARGS)`, forked
    from a fork server that has imported `rank.preload()`. Does nothing when `rank` is None.

    torch.distributed.run builds its entrypoint inside run() (config_from_args), with no option
    for a module run as a function; for this agent process's run that name answers with ours
    (tests/test_warm_ranks.py fails if a torch release renames it).
    """
    import torch.distributed.run as torch_run

    if rank is None:
        yield
        return
    own_config = torch_run.config_from_args

    def warm_config(args):
        config, _cmd, _cmd_args = own_config(args)  # sets OMP_NUM_THREADS, which the fork server inherits
        return config, run_module_as_rank, [rank.module, *rank.argv]

    os.environ.setdefault(NVML_CUDA_CHECK, "1")
    multiprocessing.set_forkserver_preload(rank.preload())
    torch_run.config_from_args = warm_config
    worker_log = logging.getLogger(WORKER_LOG)
    worker_log.addFilter(_without_traceback)
    try:
        yield
    finally:
        torch_run.config_from_args = own_config
        worker_log.removeFilter(_without_traceback)


def _without_traceback(record: logging.LogRecord) -> bool:
    """A failed rank has said what went wrong; the agent's line says which rank and its exit code."""
    record.exc_info = None
    record.exc_text = None
    return True


FORK_SERVER_TITLE = "sd35dist torchrun fork server"


def fork_server_title(run_dir: str | None) -> str:
    """What `ps` shows for the fork server (set by warm_fork_server): with the run directory, if any."""
    return f"{FORK_SERVER_TITLE} {run_dir}" if run_dir else FORK_SERVER_TITLE


def rank_title(module: str, argv: tuple[str, ...] | list[str]) -> str:
    """The command line `ps` shows for a warm rank: the one torchrun would have started."""
    return " ".join([sys.executable, "-u", "-m", module, *argv])


def run_module_as_rank(module: str, *argv: str) -> None:
    """In a forked rank: run `module` as `python -u -m module ARGV…` would, in this process.

    A non-zero exit status leaves as SystemExit, which torchrun's worker records as the rank's exit
    code; an uncaught exception prints its traceback and exits 1; exit handlers run here, since a
    forked worker leaves through os._exit."""
    import setproctitle
    import torch

    gc.enable()  # on in the fork server once its setup ran (warm_fork_server); a rank must not depend on that
    _unbuffered_stdio()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the fork server ignores it (warm_fork_server)
    setproctitle.setproctitle(rank_title(module, argv))
    if torch.cuda.is_initialized():
        print("error: CUDA was initialised before the ranks were forked, so they cannot use it; set "
              "launch.warm_ranks: false in the profile (torchrun --start-method=spawn)", file=sys.stderr, flush=True)
        raise SystemExit(2)
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except Exception:  # noqa: BLE001  (any uncaught exception, as the interpreter's top level)
        # What the interpreter does with an uncaught exception: the traceback on the rank's stderr
        # (torch's worker would keep it in a file nobody reads) and exit status 1.
        sys.excepthook(*sys.exc_info())
        raise SystemExit(1) from None
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()


def _unbuffered_stdio() -> None:
    """`python -u`: the fork server's buffered streams would hold a rank's last lines when it is killed."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=old.encoding, errors=old.errors,
                                  write_through=True)
        setattr(sys, name, stream)
