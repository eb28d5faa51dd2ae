"""Driver for the full-width load test; every rank of a 2-rank torchrun runs it (gloo on CPU).

    python -m torch.distributed.run --standalone --nproc-per-node=2 -m tests.large_load_check MODEL_DIR OUT_DIR

Loads MODEL_DIR's transformer (SD3.5 Large's width, reduced depth, bf16, several files)
through the real path (`load_transformer`: meta build → fully_shard → materialise → copy
each rank's slice), with fp32 master weights, while a thread samples this process's
anonymous resident memory (RssAnon: what the process allocated itself; the safetensors
files' mapped pages are page cache the kernel can drop). Records per rank, into
OUT_DIR/result.json (written by rank 0): the peak rise of RssAnon during the load, the
shard's bytes, the buffers' bytes (pos_embed: whole on every rank by design), and whether every local shard equals its rows of the files.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

SAMPLE_S = 0.002


def rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """The highest RssAnon seen while the `with` block runs."""

    def __enter__(self) -> PeakSampler:
        self.peak = rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(SAMPLE_S)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def shards_equal_files(model, model_dir: Path) -> bool:
    """Every parameter's local shard equals its rows of the checkpoint tensor (read by slice, in fp32)."""
    from safetensors import safe_open

    from sd35dist.models.state_keys import plain_name
    from sd35dist.models.transformer_build import checkpoint_key_files

    key_files = checkpoint_key_files(model_dir / "transformer")
    for name, param in model.named_parameters():
        name = plain_name(name)
        local = param.to_local()
        rows = param.__class__.__name__ == "DTensor" and local.shape[0]
        start = _shard_start(param) if rows else 0
        with safe_open(key_files[name], framework="pt", device="cpu") as handle:
            expected = handle.get_slice(name)[start : start + local.shape[0]].float()
        if not torch.equal(local, expected):
            return False
    return True


def _shard_start(param) -> int:
    """First row of this rank's Shard(0) chunk (torch.chunk's split: ceil(rows / n) per rank)."""
    mesh = param.device_mesh
    n, index = mesh.size(), mesh.get_local_rank()
    return -(-param.shape[0] // n) * index


def main(argv: list[str] | None = None) -> int:
    from sd35dist.parallel.fsdp2_sharding import load_transformer
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)

    world = init_process_group_from_env(timeout_s=300)
    try:
        dist.barrier()  # load side by side, as a job does
        with PeakSampler() as sampler:
            baseline = rss_anon_bytes()
            model = load_transformer(args.model_dir, world=world, dtype=torch.float32, param_dtype=torch.bfloat16)
        shard = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        mine = {"rss_rise": sampler.peak - baseline, "shard_bytes": shard, "buffer_bytes": buffers,
                "equal": shards_equal_files(model, args.model_dir)}
        gathered = [None] * world.world_size
        dist.all_gather_object(gathered, mine)
        if world.is_main:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            (args.out_dir / "result.json").write_text(json.dumps({"ranks": gathered}))
        dist.barrier()
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
