"""Names of files in a run directory that both sides read or write (no torch here).

The batch script (launcher/render.py) writes the PREEMPT file; the ranks
(sd35dist/train/preemption.py) watch for it.
"""

PREEMPT_FILE = "PREEMPT"
"""Present while the ranks are asked to save and stop (Slurm's time-limit warning, or a user)."""
