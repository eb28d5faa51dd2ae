"""`make demo`'s program end to end in a scratch working directory, and README's account of it."""

from __future__ import annotations

import ast
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors import safe_open

from sd35dist.demo.program import IMAGES, LORA_RECIPE, RECIPE, STOP_AT_STEP, training_run_dirs
from sd35dist.models.tiny_sd3 import SD3_VAE_SIZES, has_vae_sizes
from sd35dist.trainer.lr_schedule import learning_rate_at
from sd35dist.validation.report import read_runs
from tests.cli_runs import PROJECT, venv_env
from tests.comfy_vae_rule import comfy_vae_problems, single_file_vae_shapes

README_HEADING = "### What `make demo` does"


def readme_demo_section() -> tuple[str, list[str]]:
    """README's demo section: its prose (one line), and the lines of its block of printed output."""
    readme = (PROJECT / "README.md").read_text()
    section = readme[readme.index(README_HEADING):]
    section = section[:section.index("\n#", len(README_HEADING))]
    prose, block, _ = section.split("```")
    return " ".join(prose.split()), [line for line in block.splitlines() if line.strip()]


def step_numbers(text: str) -> set[int]:
    """Numbers the text gives as steps: `step 16`, `steps 0, 16 and 32`, `steps 17 to 32`, `32 steps`."""
    numbers = re.findall(r"(\d+)[ -]steps?\b", text)
    for run in re.findall(r"\bsteps? (\d+(?:(?:, | and | to | → )\d+)*)", text):
        numbers += re.findall(r"\d+", run)
    return {int(n) for n in numbers}


def line_pattern(readme_line: str) -> re.Pattern[str]:
    """A README output line as a pattern: losses, speeds, times, run-directory dates vary; step
    numbers, counts and learning rates (a function of the step) must be as printed."""
    varying = r"(?<!lr )\b\d+\.\d+(?:e[-+]\d+)?|\d{8}-\d{6}|eta \d+h\d\dm"
    parts = re.split(f"({varying})", readme_line)
    return re.compile("".join(re.escape(part) if not re.fullmatch(varying, part)
                              else r"eta \d+h\d\dm" if part.startswith("eta") else r"[-+.\w]+" for part in parts))


@pytest.mark.unit
def test_readme_gives_the_demo_s_numbers(tiny_model):
    from diffusers import SD3Transformer2DModel

    prose, block = readme_demo_section()
    transformer = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer")
    thousands = round(sum(p.numel() for p in transformer.parameters()) / 1000)
    assert f"a transformer of {thousands}k parameters" in prose
    tiny = yaml.safe_load(RECIPE.read_text())["train"]
    lora_steps = yaml.safe_load(LORA_RECIPE.read_text())["train"]["max_train_steps"]
    total, every = tiny["max_train_steps"], tiny["checkpointing_steps"]
    said = step_numbers(prose)
    assert {STOP_AT_STEP, total, lora_steps} <= said, said
    assert said <= {0, 1, STOP_AT_STEP, STOP_AT_STEP + 1, total, every, lora_steps}, "a step the demo does not take"
    assert f"{IMAGES} captioned images" in prose and f"{tiny['lr_warmup_steps']} warmup step" in prose
    submit = "$ sd35dist submit --profile local --recipe recipes/tiny.yaml --wait"
    assert f"{submit} --set train.stop_at_step={STOP_AT_STEP}" in block and submit in block, "stopped, then resumed"
    assert f"sd35dist: step {total}/{total}" in "\n".join(block) and f"sd35dist: done: {total} steps" in block
    assert line_pattern("sd35dist: step 16/16, loss 3.6652, lr 1.73e-03, img/s 6.4, eta 0h00m").fullmatch(
        "sd35dist: step 16/16, loss 3.1, lr 1.73e-03, img/s 9.0, eta 0h01m")
    assert not line_pattern("sd35dist: step 16/16, lr 1.73e-03").fullmatch("sd35dist: step 16/16, lr 3.28e-05")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {node.module or ""} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.unit
def test_the_demo_is_one_package_that_runs_the_cli_one_way():
    demo = PROJECT / "sd35dist" / "demo"
    for path in demo.glob("*.py"):
        reached = {name for name in imported_modules(path) if name.startswith(("sd35dist.cli", "sd35dist.jobs"))}
        assert not reached, f"{path.name} calls the CLI in-process ({reached}): the demo runs it as a user does"
    for path in [*(PROJECT / "sd35dist").rglob("*.py"), *(PROJECT / "launcher").rglob("*.py")]:
        if demo not in path.parents:
            assert not any(name.startswith("sd35dist.demo") for name in imported_modules(path)), path
    assert not [p.name for p in (PROJECT / "sd35dist").rglob("*demo*.py") if demo not in p.parents]


@pytest.mark.dist
def test_demo_runs_end_to_end_as_the_readme_says(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sd35dist.demo"], capture_output=True, text=True, cwd=tmp_path,
                          env=venv_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    # What the README shows, paths as `make demo` in the project root prints them.
    printed = out.replace(f"{tmp_path}/", "").replace(f"{PROJECT}/", "").splitlines()
    _, readme_lines = readme_demo_section()
    commands = [line for line in printed if line.startswith("$ sd35dist")]
    assert commands == [line for line in readme_lines if line.startswith("$ sd35dist")], "README: the same commands"
    for line in readme_lines:
        assert any(line_pattern(line).fullmatch(p) for p in printed), f"README shows a line not printed: {line}"

    assert out.count("ended: COMPLETED") == 6, "preflight, cache, train twice, sweep, and the LoRA leg's train"
    assert "submitit INFO" not in out
    demo = tmp_path / "runs" / "demo"
    checkpoints = demo / "output" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [f"step-{STOP_AT_STEP:08d}", "step-00000032"]
    with Image.open(demo / "output" / "sweep" / "grid.png") as sweep:  # steps 16 and 32 x 2 seeds, 3 prompts, 32 px
        assert sweep.width > 4 * 32 and sweep.height > 3 * 32

    # The report's learning-rate plot is one schedule over both submissions: warmup, then one cosine
    # to step 32, no jump. `records` is what write_report plots (read_runs over the demo's run chain).
    runs = sorted((tmp_path / "runs").glob("tiny-train-*"))
    assert len(runs) == 2 and training_run_dirs(tmp_path / "runs") == runs
    report_html = (demo / "report" / "report.html").read_text()
    shown_runs = [html.escape(str(run.relative_to(tmp_path))) for run in runs]  # as the demo names them
    assert all(run in report_html for run in shown_runs), "one report over both submissions"
    records = read_runs(runs)
    assert list(records) == list(range(1, 33))
    lrs = [records[step]["lr"] for step in records]
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1])), "warmup rises"
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])), f"then falls without a jump: {lrs}"
    tiny = yaml.safe_load(RECIPE.read_text())["train"]
    assert lrs == [learning_rate_at(s, base_lr=tiny["learning_rate"], scheduler=tiny["lr_scheduler"],
                                    warmup_steps=tiny["lr_warmup_steps"], total_steps=32) for s in range(32)]

    assert (demo / "export" / "transformer" / "config.json").is_file()
    for image in ("sample.png", "sample-lora.png"):
        with Image.open(demo / image) as sample:
            assert sample.size == (64, 64)
    assert (demo / "export-lora" / "pytorch_lora_weights.safetensors").is_file()
    grids = [line.split()[-1] for line in printed if line.strip().startswith("validation grid, step")]
    assert [Path(g).parent.name for g in grids] == ["step-000000", "step-000016", "step-000032"]
    with Image.open(tmp_path / grids[0]) as first, Image.open(tmp_path / grids[-1]) as last:
        # 2 weights x 2 seeds, 3 prompts, 32 px
        assert first.size == last.size and first.width > 4 * 32 and first.height > 3 * 32
    assert (demo / "report" / "report.html").stat().st_size > 10_000
    assert (demo / "report" / "plots" / "lr.png").is_file()
    assert (demo / "export" / "tiny-sd3-ft.safetensors").is_file() and "‖Δ‖/‖W_base‖" in out
    assert (demo / "export" / "change-by-block.png").read_bytes()[:4] == b"\x89PNG"
    assert "demo finished" in out
    comfy = {line.split("<-")[0].strip(): tmp_path / line.split("<-")[1].split(" (")[0].strip()
             for line in out.splitlines() if "ComfyUI/models/" in line}
    assert comfy == {"ComfyUI/models/checkpoints/": demo / "export" / "tiny-sd3-ft.safetensors",
                     "ComfyUI/models/loras/": demo / "export-lora" / "pytorch_lora_weights.safetensors"}
    assert all(path.is_file() for path in comfy.values()), "the ComfyUI-ready files it names exist"
    # Load Checkpoint: the demo's VAE has SD3's shape, so ComfyUI's VAE takes it with no missing, leftover or
    # mismatched key; no text encoders, which ComfyUI would build at full size and fail to load.
    assert has_vae_sizes(demo / "tiny-sd3", SD3_VAE_SIZES)
    checkpoint = comfy["ComfyUI/models/checkpoints/"]
    assert len(single_file_vae_shapes(checkpoint)) == 244 and comfy_vae_problems(single_file_vae_shapes(checkpoint)) == []
    with safe_open(str(checkpoint), framework="pt") as handle:
        assert not [key for key in handle.keys() if not key.startswith(("model.diffusion_model.", "first_stage_model."))]
