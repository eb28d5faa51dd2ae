"""sd35dist: SD3.5 Large full fine-tunes on Slurm. Rank side and CLI; imports nothing heavy at top level."""

__version__ = "0.1.0"
