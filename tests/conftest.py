"""Shared test wiring: the tier rules (tests/tiers.py) and the fixtures more than one module uses.

Fixtures that are read-only once built live here at session scope, so each is built once per
pytest run: the tiny SD3 model, the bf16 latent cache the training tests read, one S3-protocol
server, one two-node Slurm cluster. A test that needs to change one copies it first. Plain
functions the tests share live in their own modules (cli_runs, cache_runs, train_runs,
preflight_runs): no test module imports another.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.cli_runs import PROJECT, torch_extensions_dir, venv_env
from tests.run_order import TIER_ORDER, longest_first, unit_of
from tests.tiers import TierRules


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(TierRules(), "sd35dist-tiers")


SLURM_TEST_FILES = "tests/test_slurm"
"""Where the Slurm tests live (tests/tiers.py refuses a slurm test elsewhere): xdist's scheduler sees
only node ids, so the file name is what sends them to one worker."""


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test` runs two pytest-xdist workers. A module's tests stay on one worker (its module-scoped
    fixtures, often one training run that several tests read, are built once), and the Slurm tests,
    which share one cluster on fixed ports, are one unit. Workers take the units in the collection's
    order (tests/run_order.py: longest first), not xdist's default of most tests first. (xdist's own
    `loadgroup` marks are lost on pytest 9, whose node ids it can no longer rewrite.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndOneSlurmCluster(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid.split("::", 1)[0], SLURM_TEST_FILES)

    config.option.loadscopereorder = False
    return ModulesAndOneSlurmCluster(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The units longest first (tests/run_order.py), each unit's tests in their own order. A pure
    function of the collection, as xdist requires (every worker collects the same list)."""
    by_unit: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_unit.setdefault(unit_of(item.nodeid.split("::", 1)[0], SLURM_TEST_FILES), []).append(item)
    units = [(unit, _tier(tests[0])) for unit, tests in by_unit.items()]
    items[:] = [item for unit in longest_first(units) for item in by_unit[unit]]


def _tier(item: pytest.Item) -> str:
    return next((name for name in TIER_ORDER if item.get_closest_marker(name) is not None), "unit")


@pytest.fixture
def project() -> Path:
    return PROJECT


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny SD3 (real diffusers classes, seed 0) as a model folder; read-only: copy it to change it."""
    from sd35dist.models.tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")


@pytest.fixture(scope="session")
def cache(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """(tiny model, its bf16 latent cache of tests/cache_runs.py's inputs), built by `sd35dist cache`
    in one process. Read-only, except `cache --validation-only`, which adds the validation prompts'
    embeddings (the same for every test: tests/validation_check.py's)."""
    from tests.cache_runs import run_cache, write_inputs, write_recipe

    root = tmp_path_factory.mktemp("train-cache")
    recipe = write_recipe(root / "cache.yaml", tiny_model, write_inputs(root / "images"), str(root / "cache"),
                          cache_dtype="bf16")
    run_cache(recipe)
    return tiny_model, root / "cache"


@pytest.fixture(scope="module")
def parts(tiny_model):
    """The tiny model loaded for rendering: (model folder, two prompts' and a negative's embeddings,
    the transformer, the VAE). Module scope: each module that renders gets its own objects."""
    from diffusers import SD3Transformer2DModel

    from sd35dist.data.validation_prompts import PromptEmbeddings
    from sd35dist.models.prompt_encoding import encode_prompts
    from sd35dist.models.sd3_components import load_text_encoders, load_vae

    text = load_text_encoders(tiny_model)
    embeds, pooled = encode_prompts(text, ["a red fox", "k4s4, a blue square"], 32)
    negative, negative_pooled = encode_prompts(text, ["blurry"], 32)
    embeddings = PromptEmbeddings(("a red fox", "k4s4, a blue square"), embeds, pooled, negative, negative_pooled)
    transformer = SD3Transformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    return tiny_model, embeddings, transformer, load_vae(tiny_model)


@pytest.fixture(scope="module")
def deepspeed_on_cpu():
    """DeepSpeed's CPU accelerator, and its C++ op builds cached where the Makefile keeps them
    (`pytestmark = pytest.mark.usefixtures("deepspeed_on_cpu")` in a module that runs ZeRO). The venv's
    ninja first on PATH, as `make` and the ranks (venv_env) have it: pytest started without the venv's bin
    on PATH found Debian's older ninja, whose command hashes differ, so each rebuilt the ops the other built
    (a minute of both cores, twice per run)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DS_ACCELERATOR", "cpu")
        patch.setenv("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
        patch.setenv("PATH", venv_env()["PATH"])
        yield


@pytest.fixture(scope="session")
def s3_server():
    """One S3-protocol server (moto) on 127.0.0.1 for the whole run; tests use their own buckets."""
    from tests.s3_server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slurm_env():
    """Start the dev cluster; yield the environment a user has after `export SLURM_CONF=…`.
    A cluster that does not start fails the tests that need it (never skips them)."""
    # Not under pytest's tmp: that is mode 0700 and munged runs as the munge user.
    cluster_dir = Path(tempfile.mkdtemp(prefix="sd35dist-slurm-"))
    cluster_dir.chmod(0o755)
    script = PROJECT / "slurm" / "devcluster.sh"
    proc = subprocess.run(
        ["bash", str(script), "start", "--dir", str(cluster_dir)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        subprocess.run(["bash", str(script), "stop", "--dir", str(cluster_dir)], capture_output=True)
        pytest.fail(f"the Slurm dev cluster did not start (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    export = proc.stdout.strip().splitlines()[-1]
    assert export.startswith("export SLURM_CONF="), export
    conf = export.split("=", 1)[1]
    try:
        yield venv_env(SLURM_CONF=conf, SD35DIST_STATE_DIR=str(cluster_dir / "state"))
    finally:
        subprocess.run(["bash", str(script), "stop", "--dir", str(cluster_dir)], capture_output=True, timeout=120)
        shutil.rmtree(cluster_dir, ignore_errors=True)
