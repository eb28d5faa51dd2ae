"""Hugging Face datasets as parquet sources (hf://datasets/ORG/NAME[@REVISION][/GLOB]): parsed in the
recipe (a bad one: one line, exit 2); resolved once by `sd35dist submit` for the cache job into the
profile's hf_home, downloading only the files the glob selects; already cached → no network, the
cache builds offline from the local snapshot; gated, missing revision, no repository, no network:
one line, exit 2, nothing written. The hub is tests/hub_cache.py's server on 127.0.0.1."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from sd35dist.config.hf_datasets import matching_files, parse_hf_dataset_url
from sd35dist.data.manifest import read_manifest
from sd35dist.data.storage import Store
from sd35dist.demo.dataset import DEMO_BUCKETS
from sd35dist.demo.formats import demo_samples
from tests.cli_runs import sd35dist, venv_env
from tests.hub_cache import HubRepo, HubServer, lay_out_snapshot

REPO = "someone/tiny-images"
SOURCE = f"hf://datasets/{REPO}/data/train-*.parquet"
TRAIN_FILES = ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet")
TRAIN_ROWS = 6
CLOSED_PORT = "http://127.0.0.1:9"
TOKEN = "hf_test_token_never_written_0123456789"


def dataset_files() -> dict[str, bytes]:
    """A dataset repository as datasets' push_to_hub lays it out: a train split in two parquet files, a
    test split, a README. Rows hold the image as Hugging Face datasets' Image feature ({bytes, path})
    and the caption in `text`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = list(demo_samples(TRAIN_ROWS + 2, seed=5))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def parquet(rows) -> bytes:
        table = pa.table({"image": pa.array([{"bytes": s.png, "path": f"{s.key}.png"} for s in rows], image_type),
                          "text": [s.caption for s in rows]})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=2)
        return buffer.getvalue()

    half = TRAIN_ROWS // 2
    return {TRAIN_FILES[0]: parquet(samples[:half]), TRAIN_FILES[1]: parquet(samples[half:TRAIN_ROWS]),
            "data/test-00000-of-00001.parquet": parquet(samples[TRAIN_ROWS:]), "README.md": b"# tiny images\n"}


def write_recipe(tmp_path, model, source: str = SOURCE) -> Path:
    recipe = {"name": "hubdata", "model": {"pretrained": str(model)},
              "data": {"cache_url": str(tmp_path / "cache"), "buckets": DEMO_BUCKETS, "cache_dtype": "fp32",
                       "max_sequence_length": 32, "shard_target_mb": 0.08,
                       "datasets": [{"id": "tiny", "source": source, "format": "parquet", "caption_column": "text"}]},
              "output": {"dir": str(tmp_path / "out")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def submit(tmp_path, capsys, recipe, *args: str) -> tuple[int, str, str]:
    code = main(["submit", "--profile", "local", "--job", "cache", "--recipe", str(recipe),
                 "--set", f"hf_home={tmp_path / 'hf'}", "--set", f"run_root={tmp_path / 'runs'}", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.unit
def test_urls_parse_as_huggingface_hub_writes_them():
    plain = parse_hf_dataset_url(SOURCE)
    assert (plain.repo, plain.revision, plain.pattern) == (REPO, None, "data/train-*.parquet")
    converted = parse_hf_dataset_url(f"hf://datasets/{REPO}@refs/convert/parquet/default/train/*.parquet")
    assert (converted.revision, converted.pattern) == ("refs/convert/parquet", "default/train/*.parquet")
    assert parse_hf_dataset_url(f"hf://datasets/{REPO}@v1.0").pattern == "**/*.parquet", "no path: every parquet file"
    assert parse_hf_dataset_url(f"hf://datasets/{REPO}/data").pattern == "data/**/*.parquet", "a folder"
    assert parse_hf_dataset_url(f"hf://datasets/{REPO}@feature%2Fx/a.parquet").revision == "feature/x"
    assert str(parse_hf_dataset_url(f"hf://datasets/{REPO}@v2/a.parquet")) == f"{REPO}@v2"
    files = [*dataset_files(), "data/train-x/nested.parquet", "top.parquet"]
    assert matching_files(plain.pattern, files) == list(TRAIN_FILES), "* stays in its folder (fsspec's glob rules)"
    assert matching_files("**/*.parquet", files)[-1] == "top.parquet", "** matches no folder too"
    for bad, expected in [("hf://datasets/someone", "is not a dataset repository id"),
                          (f"hf://datasets/{REPO}@", "nothing after @"),
                          (f"hf://datasets/{REPO}/../x.parquet", "may not leave the repository")]:
        with pytest.raises(ValueError, match=expected):
            parse_hf_dataset_url(bad)


@pytest.mark.unit
@pytest.mark.parametrize("dataset, key, expected", [
    ({"source": "hf://datasets/someone", "format": "parquet"}, "source",
     "hf://datasets/someone: 'someone' is not a dataset repository id: write hf://datasets/ORG/NAME[@REVISION][/GLOB]"),
    ({"source": SOURCE}, "format", "folder: a Hugging Face dataset (hf://datasets/…) is read as its parquet files: "
                                   "set format: parquet"),
])
def test_a_bad_hub_dataset_is_one_line_naming_the_key(dataset, key, expected, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tmp_path / "model")
    document = yaml.safe_load(recipe.read_text())
    document["data"]["datasets"] = [{"id": "tiny", **dataset}]
    recipe.write_text(yaml.safe_dump(document))
    code, _, err = submit(tmp_path, capsys, recipe, "--dry-run")
    assert code == 2 and err == f"error: recipe.yaml: data.datasets.0.{key}: {expected}\n", err


@pytest.mark.dist  # submit --wait runs the cache job under torchrun on the local profile
def test_a_cached_hub_dataset_builds_the_cache_offline(tiny_model, tmp_path):
    snapshot = lay_out_snapshot(tmp_path / "hf" / "hub", REPO, dataset_files(), repo_type="dataset")
    recipe = write_recipe(tmp_path, tiny_model)
    # No hub server runs: HF_ENDPOINT is a closed port, so any request would fail the submission.
    env = venv_env(HF_ENDPOINT=CLOSED_PORT, SD35DIST_STATE_DIR=str(tmp_path / "state"))
    env.pop("HF_HUB_OFFLINE", None)
    proc = sd35dist("submit", "--profile", "local", "--job", "cache", "--recipe", str(recipe), "--run-dir",
                    str(tmp_path / "run"), "--set", f"hf_home={tmp_path / 'hf'}", "--wait", env=env, timeout=600)
    assert "ended: COMPLETED" in proc.stdout and "downloading" not in proc.stdout + proc.stderr
    frozen = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert frozen["data"]["datasets"][0]["source"] == f"{snapshot.resolve()}/data/train-*.parquet", "the local snapshot"
    assert "export HF_HUB_OFFLINE=1" in (tmp_path / "run" / "job.sh").read_text(), "ranks run offline"
    manifest = read_manifest(Store(str(tmp_path / "cache")))
    assert manifest.total_samples == TRAIN_ROWS, "the train split's rows: the test split's files are not read"
    assert manifest.samples_per_dataset().keys() == {"tiny"}


@pytest.mark.process  # a local hub server on loopback
def test_submit_downloads_only_the_files_the_glob_selects_once(tiny_model, tmp_path, capsys, monkeypatch):
    files = dataset_files()
    recipe = write_recipe(tmp_path, tiny_model)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with HubServer({}, token=TOKEN, datasets={REPO: HubRepo(files, gated=True)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        code, _, err = submit(tmp_path, capsys, recipe, "--dry-run")
        assert code == 0 and hub.requests == [], "a dry run looks in the cache only"
        assert (f"note: data.datasets[0].source {SOURCE} is not in the Hugging Face cache {tmp_path / 'hf' / 'hub'}: "
                "submit downloads its files matching data/train-*.parquet there first") in err
        code, out, err = submit(tmp_path, capsys, recipe, "--output", str(tmp_path / "job.sh"))
        assert code == 0, err
        assert hub.downloaded() == set(TRAIN_FILES), "the train split's parquet files, nothing else"
        assert all(authorised for _, _, authorised in hub.requests), "the token from HF_TOKEN, sent by huggingface_hub"
    storage = tmp_path / "hf" / "hub" / f"datasets--{REPO.replace('/', '--')}"
    [snapshot] = (storage / "snapshots").iterdir()
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.parquet")) == list(TRAIN_FILES)
    run_dir = next((tmp_path / "runs").iterdir())
    frozen = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert frozen["data"]["datasets"][0]["source"] == f"{snapshot}/data/train-*.parquet"
    assert TOKEN not in "".join(p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    code, _, err = submit(tmp_path, capsys, recipe, "--output", str(tmp_path / "job2.sh"))
    assert code == 0, f"cached now: the second submit needs no hub ({err})"


@pytest.mark.process  # a local hub server on loopback
@pytest.mark.parametrize("case", ["gated", "revision", "no-network", "no-repo", "no-match"])
def test_unreachable_hub_datasets_are_one_line_with_exit_2_and_write_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    source = {"revision": f"hf://datasets/{REPO}@v9/data/train-*.parquet",
              "no-repo": "hf://datasets/someone/nothing-here",
              "no-match": f"hf://datasets/{REPO}/data/validation-*.parquet"}.get(case, SOURCE)
    recipe = write_recipe(tmp_path, tmp_path / "model", source)
    with HubServer({}, token=TOKEN, datasets={REPO: HubRepo(dataset_files(), gated=case == "gated")}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint if case != "no-network" else CLOSED_PORT)
        code, _, err = submit(tmp_path, capsys, recipe)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: recipe.yaml: data.datasets[0].source: "), err
    expected = {"gated": f"{REPO} is gated: accept its terms", "revision": f"{REPO} has no revision 'v9'",
                "no-network": f"{REPO} is not in the Hugging Face cache {tmp_path / 'hf' / 'hub'} and the hub cannot be "
                              f"reached: download it where there is network (`hf download {REPO} --repo-type dataset "
                              "--include 'data/train-*.parquet'`",
                "no-repo": "no dataset repository someone/nothing-here on the Hugging Face hub",
                "no-match": f"no file of {REPO} matches data/validation-*.parquet (its parquet files: "
                            "data/test-00000-of-00001.parquet, data/train-00000-of-00002.parquet"}[case]
    assert expected in err and ("export HF_TOKEN" in err) == (case in ("gated", "no-repo")), err
    assert not (tmp_path / "runs").exists()
    assert not list((tmp_path / "hf").rglob("*.parquet")), "nothing downloaded"


@pytest.mark.unit
def test_a_rank_handed_a_hub_dataset_says_to_start_through_submit(tmp_path):
    from sd35dist.config.loading import ConfigError
    from sd35dist.config.recipe import load_recipe
    from sd35dist.jobs.rank_inputs import check_dataset_sources

    recipe = load_recipe(write_recipe(tmp_path, tmp_path / "model"))
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].source: hf://datasets/.* is a Hugging Face dataset: "
                                          "ranks run offline on a local snapshot; start the job with `sd35dist submit`"):
        check_dataset_sources(recipe.data, "recipe.yaml")
