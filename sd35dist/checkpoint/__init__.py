"""Checkpoints: atomic layout, strategy-specific payloads, export to diffusers."""
