"""Activation checkpointing policies: which parts of which blocks recompute their forward in backward,
what each keeps for backward and what it recomputes. Pure arithmetic, no torch.

`train.gradient_checkpointing` names a policy:

    true        every block (full per-block checkpointing): keeps each block's inputs only
    false       none: every block keeps all it saves for backward
    every_N     every N-th block (blocks 0, N, 2N …) full, the others none
    attention   in every block the joint attention only (both streams' q/k/v/out and the core)
    mlp         in every block the MLPs only (image and text streams)
    auto        `plan`'s choice: the policy with the least recomputation whose predicted peak fits
                the GPU (sd35dist/config/resource_plan.py, `choose_checkpointing`)

What a JointTransformerBlock keeps per token for backward, in values of width d (bf16 under
mixed precision), counted from the tensors autograd saves in diffusers' block:
- attention (ATTENTION_D): the modulated norm1 output, q, k, v, the RMS-normed q and k, the attention
  output and the out projection's output;
- MLPs (MLP_D): the modulated norm2 output, d→4d output (the GELU's input), the GELU's output (4d),
  the MLP output before its gate;
- the rest (BLOCK_ACTIVATION_D − both): LayerNorm statistics, gates, residual sums.
A checkpointed part keeps its input (1·d) instead of what it saves. These shares are an estimate
from counting saved tensors; the sum was calibrated on two H100 peaks (resource_plan.py).

Recomputation is counted in forward matmul FLOPs of the blocks (model_flops.py's terms): attention
= 2·4d² per token (projections of both streams) + 4·d·(N+T)² (QKᵀ and AV); MLPs = 2·8d² per token.
"""

from __future__ import annotations

import dataclasses
import re

BLOCK_ACTIVATION_D = 24
"""bf16 values of width d one JointTransformerBlock keeps per token for backward (q, k, v,
normed q/k, attention out, MLP 4d in and 4d after GELU, norms, residuals)."""
ATTENTION_ACTIVATION_D = 8
"""Of BLOCK_ACTIVATION_D, what the joint attention keeps (see the module docstring)."""
MLP_ACTIVATION_D = 10
"""Of BLOCK_ACTIVATION_D, what the two MLPs keep."""
CHECKPOINT_INPUT_D = 1
"""A checkpointed block or part keeps its input: one value of width d per token."""

_EVERY = re.compile(r"^every_([0-9]+)$")
NAMED_POLICIES = ("auto", "attention", "mlp")
POLICY_HELP = "true, false, auto, attention, mlp or every_N (N ≥ 2)"


@dataclasses.dataclass(frozen=True)
class CheckpointingPolicy:
    """A resolved policy (never `auto`)."""

    kind: str
    """none | full | every | attention | mlp"""
    every: int = 1
    """every: the stride N (blocks 0, N, 2N … are checkpointed)."""

    @property
    def name(self) -> str:
        """The recipe value that asks for this policy."""
        return {"none": "false", "full": "true"}.get(self.kind, f"every_{self.every}" if self.kind == "every" else self.kind)

    def checkpointed_blocks(self, layers: int) -> tuple[int, ...]:
        """Indices of the blocks checkpointed whole."""
        if self.kind == "full":
            return tuple(range(layers))
        if self.kind == "every":
            return tuple(range(0, layers, self.every))
        return ()

    def kept_d(self, layers: int) -> float:
        """Values of width d per token all blocks together keep for backward."""
        whole = len(self.checkpointed_blocks(layers))
        part = {"attention": ATTENTION_ACTIVATION_D, "mlp": MLP_ACTIVATION_D}.get(self.kind, 0)
        per_other = BLOCK_ACTIVATION_D - part + (CHECKPOINT_INPUT_D if part else 0)
        return whole * CHECKPOINT_INPUT_D + (layers - whole) * per_other

    def recomputed_flops(self, d: int, tokens: int, layers: int) -> float:
        """Forward matmul FLOPs per sample that backward recomputes (blocks only; tokens = image + text)."""
        attention = 2 * 4 * d * d * tokens + 4 * d * tokens * tokens
        mlp = 2 * 8 * d * d * tokens
        whole = len(self.checkpointed_blocks(layers))
        part = {"attention": attention, "mlp": mlp}.get(self.kind, 0.0)
        return whole * (attention + mlp) + (layers - whole) * part

    def describe(self, layers: int) -> str:
        if self.kind == "none":
            return "none (every block keeps its activations)"
        if self.kind == "full":
            return f"every block ({layers} of {layers})"
        if self.kind == "every":
            return f"one block in {self.every} ({len(self.checkpointed_blocks(layers))} of {layers})"
        return f"{'the joint attention' if self.kind == 'attention' else 'the MLPs'} of every block"


def parse_policy(value: bool | str) -> CheckpointingPolicy | None:
    """The policy a recipe value names; None for `auto`. ValueError for anything else."""
    if value is True:
        return CheckpointingPolicy("full")
    if value is False:
        return CheckpointingPolicy("none")
    if value == "auto":
        return None
    if value in ("attention", "mlp"):
        return CheckpointingPolicy(value)
    match = _EVERY.match(str(value))
    if match and int(match.group(1)) >= 2:
        return CheckpointingPolicy("every", int(match.group(1)))
    raise ValueError(f"{value!r} is not a checkpointing policy: use {POLICY_HELP}")


def candidate_policies(layers: int) -> list[CheckpointingPolicy]:
    """Every policy worth comparing for a model of `layers` blocks: none, every_N (N from the depth down
    to 2, each a different number of blocks), attention, mlp, full."""
    out = [CheckpointingPolicy("none")]
    seen: set[int] = set()
    for every in range(max(layers, 2), 1, -1):
        count = len(range(0, layers, every))
        if count not in seen and count < layers:
            seen.add(count)
            out.append(CheckpointingPolicy("every", every))
    return out + [CheckpointingPolicy("attention"), CheckpointingPolicy("mlp"), CheckpointingPolicy("full")]
