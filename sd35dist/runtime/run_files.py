"""Names of files in a run directory that both sides read or write (no torch here).

The batch script (launcher/render.py) writes the PREEMPT file; the ranks
(sd35dist/trainer/preemption.py) watch for it. The run directory itself reaches every node as
runtime/job_env.RUN_DIR_VAR. A node's torchrun agent (sd35dist/jobs/torchrun.py)
writes the MISTAKE file; the batch script reads it.
"""

PREEMPT_FILE = "PREEMPT"
"""Present while the ranks are asked to save and stop (Slurm's time-limit warning, or a user)."""

MISTAKE_FILE = "MISTAKE"
"""Written by a node's agent that stopped for a rank's mistake (exit status 2). srun's status is
then the signal it ended the other nodes' agents with (`--kill-on-bad-exit`), whichever node
failed first; the batch script ends the job with status 2 when this file is there."""
