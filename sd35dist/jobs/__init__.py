"""Rank-side jobs run under torchrun: `python -m sd35dist <job> --recipe R --run-dir D`."""
