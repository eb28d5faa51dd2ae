"""What a user watches: a progress bar on rank 0, a JSONL metrics file per rank, wandb (offline by default).

No key is ever written: wandb reads WANDB_API_KEY from the environment when online.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sd35dist.parallel.process_group import World


class MetricsLog:
    def __init__(self, run_dir: Path, world: World, *, total_steps: int, start_step: int,
                 wandb_settings: dict[str, Any] | None = None) -> None:
        self.world = world
        self._file = open(run_dir / f"metrics-rank{world.rank:05d}.jsonl", "a", buffering=1)
        self._bar = None
        self._wandb = None
        if world.is_main:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")
            if wandb_settings is not None:
                import wandb

                self._wandb = wandb.init(dir=str(run_dir), **wandb_settings)

    def step(self, step: int, values: dict[str, float], seconds: float) -> None:
        wait = values.get("data_wait_s", 0.0)
        record = {"step": step, "time": time.time(), "rank": self.world.rank, "step_seconds": seconds,
                  "data_wait_fraction": wait / seconds if seconds > 0 else 0.0, **values,
                  "images_per_second": values.get("samples", 0.0) / seconds if seconds > 0 else 0.0}
        self._file.write(json.dumps(record) + "\n")
        if self._bar is not None:
            shown = {"loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.2e}",
                     "img_s": f"{record['images_per_second']:.1f}"}
            if "mfu" in values:  # on CUDA with a known GPU peak
                shown["mfu"] = f"{values['mfu']:.1%}"
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def note(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(f"sd35dist: {message}")
        elif self.world.is_main:
            print(f"sd35dist: {message}", flush=True)

    def close(self) -> None:
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
