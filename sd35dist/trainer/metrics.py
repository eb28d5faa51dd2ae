"""What a user watches: progress on rank 0, a JSONL metrics file per rank, wandb (offline by default).

Progress is a bar on a terminal and plain lines elsewhere (a Slurm log is not a terminal:
a bar's carriage returns would pile up there as one endless line). No key is ever
written: wandb reads WANDB_API_KEY from the environment when online.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd35dist.parallel.process_group import World

PLAIN_LINE_EVERY_S = 30.0
"""Without a terminal, a progress line at most this often (and at the first and last step)."""


def progress_line(step: int, total: int, values: dict[str, float], images_per_second: float,
                  eta_s: float | None) -> str:
    """One plain progress line, as a Slurm log shows it."""
    parts = [f"step {step}/{total}", f"loss {values['loss']:.4f}", f"lr {values['lr']:.2e}",
             f"img/s {images_per_second:.1f}"]
    if "mfu" in values:
        parts.append(f"mfu {values['mfu']:.1%}")
    if eta_s is not None:
        hours, rest = divmod(int(eta_s), 3600)
        parts.append(f"eta {hours}h{rest // 60:02d}m")
    return "sd35dist: " + ", ".join(parts)


class MetricsLog:
    def __init__(self, run_dir: Path, world: World, *, total_steps: int, start_step: int,
                 wandb_settings: dict[str, Any] | None = None, interactive: bool | None = None) -> None:
        self.world = world
        self.total_steps, self._start_step = total_steps, start_step
        self._started = time.monotonic()
        self._last_line = float("-inf")
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self._file = open(run_dir / f"metrics-rank{world.rank:05d}.jsonl", "a", buffering=1)
        self._bar = None
        self._wandb = None
        if world.is_main:
            from tqdm import tqdm

            if interactive:
                self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")
            if wandb_settings is not None:
                import wandb

                self._wandb = wandb.init(dir=str(run_dir), **wandb_settings)

    def step(self, step: int, values: dict[str, float], seconds: float, epoch_mixes: Sequence[Any] = ()) -> None:
        """One step's record; `epoch_mixes` (data/latent_stream.EpochMix) are the epochs this step finished:
        each gets a line, and the record holds the last as `epoch_mix` (wandb: `mix/<dataset>` shares)."""
        wait = values.get("data_wait_s", 0.0)
        record = {"step": step, "time": time.time(), "rank": self.world.rank, "step_seconds": seconds,
                  "data_wait_fraction": wait / seconds if seconds > 0 else 0.0, **values,
                  "images_per_second": values.get("samples", 0.0) / seconds if seconds > 0 else 0.0}
        shares: dict[str, float] = {}
        for mix in epoch_mixes:
            self.note(mix.describe())
            record["epoch_mix"] = dataclasses.asdict(mix)
            total = sum(mix.samples.values()) or 1
            shares = {f"mix/{name or 'all'}": n / total for name, n in mix.samples.items()}
        self._file.write(json.dumps(record) + "\n")
        if self._bar is not None:
            shown = {"loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.2e}",
                     "img_s": f"{record['images_per_second']:.1f}"}
            if "mfu" in values:  # on CUDA with a known GPU peak
                shown["mfu"] = f"{values['mfu']:.1%}"
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
        elif self.world.is_main:
            now = time.monotonic()
            if step in (self._start_step + 1, self.total_steps) or now - self._last_line >= PLAIN_LINE_EVERY_S:
                self._last_line = now
                done = step - self._start_step
                eta = (now - self._started) / done * (self.total_steps - step) if done > 0 else None
                print(progress_line(step, self.total_steps, values, record["images_per_second"], eta), flush=True)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "epoch_mix"} | shares, step=step)

    def note(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(f"sd35dist: {message}")
        elif self.world.is_main:
            print(f"sd35dist: {message}", flush=True)

    def image(self, step: int, key: str, path: Path) -> None:
        """An image (a validation grid) for wandb; the file itself stays in the run directory."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
