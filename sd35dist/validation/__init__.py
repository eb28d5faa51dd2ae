"""Validation: guidance (CFG, APG), the flow-matching sampler, rendering on every rank, grids, the run report."""
