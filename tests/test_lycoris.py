"""LyCORIS fine-tunes (`train.lora.type: lokr | loha`) on the tiny SD3, 2 CPU ranks: fsdp2 in bf16 compute
(LoKr with SimpleTuner's example preset) and zero2 in fp32 (LoHa). The adapters train, checkpoints
hold only them, resume is exact (EMA too), and the export is LyCORIS's file: lycoris-lora loads it
and reproduces the trained model, `inspect --diff` shows its ΔW per block, a kohya export of it is
refused in one line. One straight and one resumed run per strategy, all in one torchrun, serve every assert; export and inspect
run through the CLI's entry in this process, the merged export as a child process (`sd35dist export`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd35dist.checkpoint.layout import CheckpointDir
from tests.cli_runs import sd35dist_in_process
from tests.lora_runs import export_adapters, export_adapters_cli, lora_recipe, probe_inputs
from tests.train_runs import losses, train_in_one_group

pytestmark = [pytest.mark.dist, pytest.mark.usefixtures("deepspeed_on_cpu")]

ADAPTERS = {
    "fsdp2": ({"type": "lokr", "rank": 10000, "alpha": 1.0, "full_matrix": True,
               "preset": {"target_module": ["Attention", "FeedForward"],
                          "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}}, "bf16"),
    "zero2": ({"type": "loha", "rank": 4, "alpha": 2.0, "targets": "attention_ff"}, "fp32"),
}
"""fsdp2: SimpleTuner's lycoris_config example (whole-matrix LoKr) in bf16 compute; zero2: a LoHa in fp32."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> Path:
    """Per strategy, a straight 4-step run and a run resumed from its step-2 checkpoint; all four in one
    torchrun (tests/trainings_check.py), each as `sd35dist train` runs it on a rank."""
    root = tmp_path_factory.mktemp("lycoris")
    runs = []
    for strategy, (adapter, precision) in ADAPTERS.items():
        (root / strategy).mkdir()
        here = root / strategy
        halfway = str(CheckpointDir(here / "straight").path(2))
        runs += [(lora_recipe(here / "straight.yaml", cache, here / "straight", strategy, mixed_precision=precision,
                              lora=adapter), here / "run0"),
                 (lora_recipe(here / "resume.yaml", cache, here / "resumed", strategy, mixed_precision=precision,
                              lora=adapter, resume=halfway), here / "run2")]
    train_in_one_group(*runs)
    return root


@pytest.fixture(scope="module", params=list(ADAPTERS))
def runs(request, trained) -> tuple[str, Path]:
    return request.param, trained / request.param


def test_lycoris_trains_resumes_exactly_and_exports_what_lycoris_loads(runs, cache, tmp_path):
    from diffusers import SD3Transformer2DModel
    from lycoris import create_lycoris_from_weights
    from safetensors import safe_open

    from sd35dist.checkpoint.export import checkpoint_state
    from sd35dist.config.recipe import LoraSection
    from sd35dist.models.lora import inject_lora

    strategy, root = runs
    model_dir, _ = cache
    expected = losses(root / "run0")
    assert sorted(expected) == [1, 2, 3, 4] and losses(root / "run2") == {s: expected[s] for s in (3, 4)}
    straight_dir = CheckpointDir(root / "straight").latest()
    for use_ema in (False, True):
        resumed = checkpoint_state(CheckpointDir(root / "resumed").latest(), use_ema)
        straight = checkpoint_state(straight_dir, use_ema)
        assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    adapters = {k: v for k, v in straight.items() if ".lokr_w" in k or ".hada_w" in k}
    assert adapters and set(straight) - set(adapters) <= {"pos_embed.pos_embed"}, \
        "a LyCORIS checkpoint holds its adapters (and FSDP2's buffer) only"
    zero_at_start = [k for k in adapters if k.endswith(("lokr_w2.default", "hada_w2_a.default"))]
    assert zero_at_start and all(adapters[k].abs().max() > 0 for k in zero_at_start if "add_q_proj" not in k), \
        "the halves LyCORIS starts at zero moved"
    assert all(t.dtype == torch.float32 for t in adapters.values()), "fp32 masters"

    export_adapters(root / "straight", tmp_path / "lyco", "--ema", "--dtype", "fp32")
    file = tmp_path / "lyco" / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    section = LoraSection(**ADAPTERS[strategy][0])
    assert json.loads(metadata["lycoris_config"])["algo"] == section.type and all(k.startswith("lycoris_") for k in keys)

    # The trained model (base + the checkpoint's EMA adapters in peft's layers) = the base with
    # lycoris-lora's own modules built from our file.
    trained = SD3Transformer2DModel.from_pretrained(model_dir / "transformer", dtype=torch.float32).eval()
    inputs = probe_inputs(trained.config)
    inject_lora(trained, section, dtype=torch.float32)
    assert not trained.load_state_dict(adapters, strict=False).unexpected_keys
    base = SD3Transformer2DModel.from_pretrained(model_dir / "transformer", dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(**inputs, return_dict=False)[0]
        network, _ = create_lycoris_from_weights(1.0, str(file), base)
        network.apply_to()
        theirs, ours = base(**inputs, return_dict=False)[0], trained(**inputs, return_dict=False)[0]
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), (theirs - ours).abs().max()
    assert (ours - before).abs().max() > 1e-3, "the adapters change the outputs"

    status, shown, err = sd35dist_in_process("inspect", str(file), "--summary", "--diff", str(model_dir), "--png",
                                             str(tmp_path / "d.png"))
    assert status == 0, err
    table = shown.split("change against", 1)[1].splitlines()
    rows = {" ".join(line.split()[:3]): line.split() for line in table if line.startswith("joint block")}
    assert len(rows) == 2 and all(float(row[-1]) > 0 for row in rows.values()), shown
    status, _, refused = sd35dist_in_process("export", str(root / "straight"), "--format", "kohya", "--out",
                                             str(tmp_path / "k.safetensors"))
    assert status == 2 and refused.count("\n") == 1 and "no kohya LoRA form" in refused
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("runs", ["fsdp2"], indirect=True)
def test_merged_lycoris_equals_the_trained_model(runs, cache, tmp_path):
    from diffusers import SD3Transformer2DModel

    strategy, root = runs
    model_dir, _ = cache
    export_adapters_cli(root / "straight", tmp_path / "merged", "--ema", "--merge", "--dtype", "fp32")  # as typed
    export_adapters(root / "straight", tmp_path / "lyco", "--ema", "--dtype", "fp32")
    merged = SD3Transformer2DModel.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = SD3Transformer2DModel.from_pretrained(model_dir / "transformer", dtype=torch.float32).eval()
    from lycoris import create_lycoris_from_weights

    network, _ = create_lycoris_from_weights(1.0, str(tmp_path / "lyco" / "pytorch_lora_weights.safetensors"), base)
    network.merge_to()
    ours, theirs = merged.state_dict(), base.state_dict()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours), "--merge = lycoris-lora's merge_to"
