"""The first thing the fork server for warm ranks imports (sd35dist/jobs/warm_ranks.py): the cyclic garbage
collector is switched off while the job's libraries import.

Importing torch, diffusers and what they pull in allocates millions of objects that live as long as the
process, and the collector, counting allocations, walks them over and over while they arrive: about
1 CPU-s of the fork server's 7 on a 2-core machine (median of five, docs/benchmarks.md), paid again at
every launch and on every node. warm_fork_server, imported last, freezes what was imported and turns
the collector back on, so every forked rank collects as usual.

Nothing else imports it: importing it switches the collector off in the importing process.
"""

from __future__ import annotations

import gc

gc.disable()
