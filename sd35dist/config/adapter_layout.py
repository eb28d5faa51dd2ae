"""The tensors of one LyCORIS adapter (LoKr, LoHa) on one Linear, and the scale it applies: pure arithmetic.

What LyCORIS builds for a Linear of `in_dim` → `out_dim` (read from KohakuBlueleaf/LyCORIS at
f49d30d and lycoris-lora 4.1.3: functional/general.py `factorization`, modules/lokr.py and
modules/loha.py `__init__`; tests/test_lycoris_units.py checks every rule here against the
installed lycoris-lora and peft's layers):

- LoKr: ΔW = scale · kron(w1, w2). The output and input widths are split by `factorization`
  (out = a·c, in = b·d, a ≤ c, b ≤ d); w1 is (a, b), w2 is (c, d). w2 is a whole matrix when
  full_matrix or rank ≥ max(c, d) / 2, else the product w2_a (c, r) · w2_b (r, d); w1 is whole
  unless decompose_both and rank < max(a, b) / 2 (then w1_a (a, r) · w1_b (r, b)). The scale is
  alpha / rank, except 1 when both halves are whole matrices. The file's `.alpha` holds rank
  then (LyCORIS stores the alpha it used), and loaders recompute the scale from the layout.
- LoHa: ΔW = scale · (w1_a · w1_b) ⊙ (w2_a · w2_b), each (out, r) · (r, in); scale alpha / rank.

The launcher plans memory with these counts, so nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m · n = dimension and m ≤ n: m = factor when it divides, else the most balanced
    split whose smaller side does not exceed factor (-1: no bound). LyCORIS's rule."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclasses.dataclass(frozen=True)
class AdapterLayout:
    """One LyCORIS adapter on one Linear: its tensors (LyCORIS's names → shapes) and its scale."""

    algo: str
    shapes: dict[str, tuple[int, int]]
    scale: float
    stored_alpha: float
    """The `.alpha` LyCORIS writes beside the tensors (rank for a LoKr of two whole matrices)."""

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def whole_matrices(self) -> bool:
        """LoKr with neither half factored: loaders take scale 1 whatever `.alpha` says."""
        return self.algo == "lokr" and "lokr_w1" in self.shapes and "lokr_w2" in self.shapes


def lokr_layout(in_dim: int, out_dim: int, *, rank: int, alpha: float, factor: int = -1,
                decompose_both: bool = False, full_matrix: bool = False) -> AdapterLayout:
    in_m, in_n = factorization(in_dim, factor)
    out_l, out_k = factorization(out_dim, factor)
    shapes: dict[str, tuple[int, int]] = {}
    if decompose_both and rank < max(out_l, in_m) / 2 and not full_matrix:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (out_l, rank), (rank, in_m)
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    if rank < max(out_k, in_n) / 2 and not full_matrix:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (out_k, rank), (rank, in_n)
    else:
        shapes["lokr_w2"] = (out_k, in_n)
    whole = "lokr_w1" in shapes and "lokr_w2" in shapes
    used_alpha = float(rank) if whole else float(alpha)
    return AdapterLayout("lokr", shapes, used_alpha / rank, used_alpha)


def loha_layout(in_dim: int, out_dim: int, *, rank: int, alpha: float) -> AdapterLayout:
    shapes = {"hada_w1_a": (out_dim, rank), "hada_w1_b": (rank, in_dim),
              "hada_w2_a": (out_dim, rank), "hada_w2_b": (rank, in_dim)}
    return AdapterLayout("loha", shapes, float(alpha) / rank, float(alpha))


def adapter_layout(algo: str, in_dim: int, out_dim: int, *, rank: int, alpha: float, factor: int = -1,
                   decompose_both: bool = False, full_matrix: bool = False) -> AdapterLayout:
    if algo == "lokr":
        return lokr_layout(in_dim, out_dim, rank=rank, alpha=alpha, factor=factor, decompose_both=decompose_both,
                           full_matrix=full_matrix)
    if algo == "loha":
        return loha_layout(in_dim, out_dim, rank=rank, alpha=alpha)
    raise ValueError(f"unknown LyCORIS algo {algo!r}: lokr or loha")
