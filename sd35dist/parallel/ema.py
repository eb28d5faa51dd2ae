"""Exponential moving average of the weights, sharded exactly like the model, and when it is updated.

Each strategy keeps its EMA next to what it shards. With FSDP2 each parameter is a DTensor;
its EMA is a DTensor with the same placements, so every rank keeps only its shard (fp32),
checkpoints save it through the same torch.distributed.checkpoint call as the model, and
export gathers it like the model. With ZeRO it follows DeepSpeed's master-weight fragments.
The update schedule (`ema_decay_at`) lives here too: the EMA is one concept in one file.
"""

from __future__ import annotations

import torch


def ema_decay_at(step: int, *, decay: float, start_step: int, update_interval: int) -> float | None:
    """The decay to apply after optimizer step `step` (1-based), or None when no update is due.

    Before `start_step` the EMA follows the weights (decay 0), so it starts from the
    fine-tuned weights rather than lagging behind from the pretrained ones.
    """
    if step % update_interval:
        return None
    return 0.0 if step < start_step else decay


class ShardedEMA:
    def __init__(self, named_parameters: list[tuple[str, torch.Tensor]]) -> None:
        self.shadow = {name: p.detach().clone().to(torch.float32) for name, p in named_parameters}

    @torch.no_grad()
    def update(self, named_parameters: list[tuple[str, torch.Tensor]], decay: float) -> None:
        for name, param in named_parameters:
            shadow = self.shadow[name]
            shadow.lerp_(param.detach().to(torch.float32), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, tensor in self.shadow.items():
                tensor.copy_(state[name])
