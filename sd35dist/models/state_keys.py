"""Parameter names as the plain diffusers model has them, and how two key sets differ.

Loading pretrained weights, loading them into ZeRO-3 partitions and exporting a checkpoint all
compare the keys a model expects with the keys a file holds, and all name parameters without
the wrappers training adds to module paths. Pure functions of strings; no torch.
"""

from __future__ import annotations

from collections.abc import Iterable

# Prefixes that wrappers insert into module paths but not into state-dict keys:
# activation checkpointing (checkpoint_wrapper) and torch.compile; and peft's LoRA layer,
# whose wrapped Linear is `base_layer` (the pretrained checkpoint names the Linear itself).
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "base_layer.")
# How many key names a message lists before saying "…".
KEYS_SHOWN = 5


def plain_name(name: str) -> str:
    """`name` without the wrapper prefixes: the key the unwrapped diffusers model has."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def key_mismatch(model_keys: Iterable[str], checkpoint_keys: Iterable[str], recomputable: Iterable[str] = ()) -> str | None:
    """None when the checkpoint holds exactly the model's keys (those in `recomputable` may be absent);
    otherwise what differs, e.g. "1 model keys not in the checkpoint (a.weight); 2 checkpoint keys
    the model does not have (x, y)"."""
    model, found = set(model_keys), set(checkpoint_keys)
    missing = sorted(model - found - set(recomputable))
    unexpected = sorted(found - model)
    parts = []
    if missing:
        parts.append(f"{len(missing)} model keys not in the checkpoint ({first_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint keys the model does not have ({first_few(unexpected)})")
    return "; ".join(parts) or None


def first_few(keys: list[str]) -> str:
    shown = ", ".join(keys[:KEYS_SHOWN])
    return shown + (", …" if len(keys) > KEYS_SHOWN else "")
