"""`make demo`'s model-files leg: what training changed, and the fine-tune as one shareable file.

After the demo's diffusers export, the same checkpoint goes out as one safetensors file in
Stability's SD3.5 layout (with the VAE, as ComfyUI loads it) next to the diffusers folder, and
`sd35dist inspect --diff` prints each block's relative change against the base model and
draws it as a bar plot.
"""

from __future__ import annotations

from pathlib import Path


def _sd35dist(*args: str) -> None:
    from sd35dist.cli import main

    print(f"\n$ sd35dist {' '.join(args)}", flush=True)
    code = main(list(args))
    if code:
        raise SystemExit(f"sd35dist {args[0]} failed with exit status {code}")


def share_and_inspect(output_dir: Path, base_model: Path, export_dir: Path) -> tuple[Path, Path]:
    """Write `export_dir/tiny-sd3-ft.safetensors` (EMA, bf16, with VAE) and the diff plot; returns both."""
    single_file = export_dir / "tiny-sd3-ft.safetensors"
    png = export_dir / "change-by-block.png"
    _sd35dist("export", str(output_dir), "--format", "single-file", "--ema", "--dtype", "bf16", "--with-vae",
              "--title", "tiny SD3 demo fine-tune", "--out", str(single_file))
    _sd35dist("inspect", str(output_dir), "--ema", "--diff", str(base_model), "--png", str(png), "--summary")
    return single_file, png
