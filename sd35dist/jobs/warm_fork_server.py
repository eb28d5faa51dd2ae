"""The fork server's own setup, for warm ranks (sd35dist/jobs/warm_ranks.py).

multiprocessing's fork server runs nothing but its preload list, as imports; this module comes last
in that list, so importing it is how the fork server sets itself up once the libraries are in.
Nothing else imports it: importing it sets up the importing process (tests read FORK_SERVER_TITLE
from warm_ranks, never from here).

- SIGTERM is ignored. Slurm signals every process of a step on scancel, requeue and preemption;
  the ranks answer by saving, but torch makes each rank's parent death a SIGINT to the rank, so a
  fork server that died of that SIGTERM would interrupt their saves. It ends with its torchrun agent
  (multiprocessing's liveness pipe), after the agent has waited for its ranks. Ranks put SIGTERM
  back to its default when they start (warm_ranks.run_module_as_rank).
- `ps` names it, with the run directory when the job script set one.
- What the libraries allocated is kept out of the garbage collector's walks (cli._entry, for the
  same reason), which also keeps it shared, page for page, with every rank forked from here. The
  collector, off while they imported (warm_fork_server_begin, first in the list), is on again.
"""

from __future__ import annotations

import gc
import signal

from setproctitle import setproctitle

from sd35dist.jobs.warm_ranks import fork_server_title
from sd35dist.runtime.job_env import JobEnvironment

signal.signal(signal.SIGTERM, signal.SIG_IGN)
setproctitle(fork_server_title(JobEnvironment.read().run_dir))
gc.freeze()
gc.enable()
