"""EMA maths (single process)."""

from __future__ import annotations

import pytest
import torch

from sd35dist.parallel.ema import ShardedEMA, ema_decay_at

pytestmark = pytest.mark.unit


def test_ema_follows_the_weights_before_start_then_averages():
    assert ema_decay_at(3, decay=0.9, start_step=5, update_interval=1) == 0.0
    assert ema_decay_at(6, decay=0.9, start_step=5, update_interval=1) == 0.9
    assert ema_decay_at(6, decay=0.9, start_step=0, update_interval=4) is None
    assert ema_decay_at(8, decay=0.9, start_step=0, update_interval=4) == 0.9


def test_ema_update_is_a_lerp_in_fp32():
    param = torch.ones(4, dtype=torch.bfloat16)
    ema = ShardedEMA([("w", param)])
    param2 = torch.full((4,), 3.0, dtype=torch.bfloat16)
    ema.update([("w", param2)], decay=0.75)
    assert ema.shadow["w"].dtype == torch.float32
    assert torch.allclose(ema.shadow["w"], torch.full((4,), 1.5))
    other = ShardedEMA([("w", torch.zeros(4))])
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["w"], ema.shadow["w"])
    with pytest.raises(KeyError, match="lacks 1"):
        ShardedEMA([("w", param), ("b", param)]).load_state_dict({"w": param.float()})
