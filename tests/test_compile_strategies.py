"""Per-block compile under FSDP2, ZeRO-2 and ZeRO-3, on 2 gloo ranks, with selective activation
checkpointing and EMA: compiled training steps, EMA weights and a validation-style no-grad forward equal
eager ones within a stated tolerance (tests/compile_check.py). The blocks compile with
`train.compile_backend: aot_eager` (the same dynamo and AOT-autograd graphs inductor gets, torch's own
kernels): inductor itself is tested in tests/test_compile_blocks.py, where one process compiles."""

from __future__ import annotations

import pytest

from tests.compile_check import run_check

pytestmark = [pytest.mark.dist, pytest.mark.usefixtures("deepspeed_on_cpu")]

RTOL = 1e-5
"""fp32 compute; aot_eager runs the traced graph with torch's kernels, so only the order of a few
recomputed float operations may differ from eager (three steps)."""


def test_compiled_blocks_train_like_eager_under_every_strategy(tiny_model, tmp_path):
    result = run_check(tiny_model, tmp_path, "fsdp2", "zero2", "zero3")
    for strategy in ("fsdp2", "zero2", "zero3"):
        eager, compiled = result[f"{strategy}-eager"], result[f"{strategy}-compiled"]
        assert eager["graphs"] == 0 and compiled["graphs"] > 0, (strategy, compiled["graphs"])
        # train.compile_backend reached torch.compile: AOT autograd traced, inductor never ran.
        assert compiled["aot_graphs"] > 0 and compiled["inductor"] == 0, (strategy, compiled)
        assert compiled["losses"] == pytest.approx(eager["losses"], rel=RTOL), strategy
        assert compiled["rendered"] == pytest.approx(eager["rendered"], rel=RTOL, abs=1e-6), strategy
        assert compiled["ema_sq"] == pytest.approx(eager["ema_sq"], rel=RTOL), strategy
        assert eager["losses"][0] != eager["losses"][-1]
    # The strategies train the same numbers eager (fp32): the comparisons above are not vacuous.
    for strategy in ("zero2", "zero3"):
        assert result[f"{strategy}-eager"]["losses"] == pytest.approx(result["fsdp2-eager"]["losses"], rel=1e-4)
