"""Checkpoints: the manager (what a checkpoint holds and when it is written), the atomic layout, export to diffusers."""
