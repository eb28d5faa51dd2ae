"""Hugging Face ids in model.pretrained: resolved once by `sd35dist submit` into the profile's
hf_home, downloading only what the job opens; already cached → no network; the job runs
offline on the local snapshot; gated, missing revision, no network: one line, exit 2; the
token travels by name only. The hub is tests/hub_cache.py's server on 127.0.0.1."""

from __future__ import annotations

import pytest
import yaml

from launcher.cli import main
from launcher.hub_models import allow_patterns, resolve_hub_model
from sd35dist.config.hub_ids import hub_id_of, parse_hub_id
from sd35dist.config.recipe import Recipe
from tests.hub_cache import HubRepo, HubServer, folder_files, lay_out_snapshot

REPO = "stabilityai/stable-diffusion-3.5-large"
TOKEN = "hf_test_token_never_written_0123456789"


def recipe_with(pretrained: str, tmp_path) -> Recipe:
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "manifest.json").write_text("{}")  # a built cache: train needs no datasets
    return Recipe.model_validate({"name": "hub", "model": {"pretrained": pretrained},
                                  "data": {"cache_url": str(tmp_path / "cache")}, "output": {"dir": str(tmp_path / "o")}})


def submit(tmp_path, capsys, recipe: Recipe, *args: str) -> tuple[int, str, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    code = main(["submit", "--profile", "local", "--recipe", str(path), "--set", f"hf_home={tmp_path / 'hf'}",
                 "--set", f"run_root={tmp_path / 'runs'}", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.unit
def test_ids_are_told_from_paths(tmp_path):
    assert parse_hub_id(REPO) == parse_hub_id(f" {REPO} ") and str(parse_hub_id(f"{REPO}@v1.0")) == f"{REPO}@v1.0"
    assert parse_hub_id(f"{REPO}@v1.0").revision == "v1.0"
    for not_an_id in ("/models/sd35", "./sd35", "~/models/x", "a/b/c", "s3://bucket/model", "name", "a/../b", "org/-x"):
        assert parse_hub_id(not_an_id) is None, not_an_id
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert hub_id_of("org/model", tmp_path) is None, "a local directory of that name wins, as in from_pretrained"
    assert hub_id_of("org/other", tmp_path) is not None
    assert allow_patterns("train") == ["model_index.json", "transformer/*", "scheduler/*"]
    assert "vae/*" in allow_patterns("cache") and "transformer/*" not in allow_patterns("cache")


@pytest.mark.process  # a local hub server on loopback
def test_a_cached_id_resolves_without_network_and_the_job_runs_offline(tiny_model, tmp_path, capsys, monkeypatch):
    snapshot = lay_out_snapshot(tmp_path / "hf" / "hub", REPO, folder_files(tiny_model))
    with HubServer({REPO: HubRepo(folder_files(tiny_model))}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        code, out, err = submit(tmp_path, capsys, recipe_with(REPO, tmp_path), "--output", str(tmp_path / "job.sh"))
        assert code == 0, err
        assert hub.requests == [], "already cached: no network"
    run_dir = next((tmp_path / "runs").iterdir())
    frozen = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert frozen["model"]["pretrained"] == str(snapshot.resolve()), "ranks get the local snapshot"
    script = (tmp_path / "job.sh").read_text()
    assert "export HF_HUB_OFFLINE=1" in script and f"export HF_HOME={tmp_path / 'hf'}" in script
    assert not any(TOKEN in p.read_text(errors="replace") for p in [*run_dir.rglob("*"), tmp_path / "job.sh"] if p.is_file())


@pytest.mark.process  # a local hub server on loopback
def test_an_uncached_id_downloads_only_what_the_job_opens(tiny_model, tmp_path, capsys, monkeypatch):
    files = folder_files(tiny_model)
    with HubServer({REPO: HubRepo(files, gated=True)}, token=TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        resolved = resolve_hub_model(recipe_with(f"{REPO}@main", tmp_path), "train", str(tmp_path / "hf"), "r.yaml")
        fetched = hub.downloaded()
        assert fetched == {n for n in files if n == "model_index.json" or n.split("/")[0] in ("transformer", "scheduler")}
        assert all(authorised for _, _, authorised in hub.requests), "the token from HF_TOKEN, sent by huggingface_hub"
        hub.requests.clear()
        again = resolve_hub_model(recipe_with(REPO, tmp_path), "train", str(tmp_path / "hf"), "r.yaml")
        assert hub.requests == [] and again.recipe.model.pretrained == resolved.recipe.model.pretrained
        cache_job = resolve_hub_model(recipe_with(REPO, tmp_path), "cache", str(tmp_path / "hf"), "r.yaml")
        assert {n.split("/")[0] for n in hub.downloaded()} == {"vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                                                               "tokenizer", "tokenizer_2", "tokenizer_3"}, "the rest only"
        assert cache_job.recipe.model.pretrained == resolved.recipe.model.pretrained, "one snapshot, filled as needed"
    assert resolved.env == {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}


@pytest.mark.process  # a local hub server on loopback
@pytest.mark.parametrize("case", ["gated", "revision", "no-network", "no-repo"])
def test_unreachable_ids_are_one_line_with_exit_2_and_write_nothing(case, tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    pretrained = {"revision": f"{REPO}@v9", "no-repo": "someone/nothing-here"}.get(case, REPO)
    with HubServer({REPO: HubRepo(folder_files(tiny_model), gated=case == "gated")}, token=TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint if case != "no-network" else "http://127.0.0.1:9")
        code, out, err = submit(tmp_path, capsys, recipe_with(pretrained, tmp_path))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: recipe.yaml: model.pretrained: "), err
    expected = {"gated": "is gated: accept its terms", "revision": "has no revision 'v9'",
                "no-network": "the hub cannot be reached", "no-repo": "no repository someone/nothing-here"}[case]
    assert expected in err and ("export HF_TOKEN" in err) == (case in ("gated", "no-repo"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.process  # a local hub server on loopback
def test_a_dry_run_looks_in_the_cache_only(tmp_path, capsys, monkeypatch):
    with HubServer({}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        code, out, err = submit(tmp_path, capsys, recipe_with(REPO, tmp_path), "--dry-run")
        assert hub.requests == []
    assert code == 0 and out.startswith("#!/bin/bash")
    assert f"note: model.pretrained {REPO} is not in the Hugging Face cache {tmp_path / 'hf' / 'hub'}" in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "runs").exists()


@pytest.mark.unit
def test_a_rank_handed_a_hub_id_says_to_start_through_submit(tmp_path):
    from sd35dist.jobs.rank_inputs import check_pretrained

    with pytest.raises(Exception, match="is a Hugging Face id: ranks run offline on a local snapshot; start the job "
                                        "with `sd35dist submit`"):
        check_pretrained(recipe_with(REPO, tmp_path), "recipe.yaml", ("transformer", "scheduler"))
