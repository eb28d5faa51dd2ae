"""What model ids and dataset URLs share on the way to the Hugging Face cache: where the cache is,
and what each way the hub can fail means to the user (one line naming what to do).

launcher/hub_models.py resolves `model.pretrained`, launcher/hub_datasets.py the hf:// dataset
sources; both call the hub inside `hub_errors`, which turns huggingface_hub's exceptions into the
ConfigError of the recipe key that named the repository. No torch here: huggingface_hub only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sd35dist.config.loading import ConfigError

TOKEN_HINT = "export HF_TOKEN (a read token) in this shell (it is read there, never written)"


def hub_cache_dir(hf_home: str | None) -> Path:
    """The hub cache (HF_HOME/hub) of the profile's hf_home, else of this shell's HF_HOME."""
    home = hf_home or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return Path(os.path.expandvars(home)).expanduser().resolve() / "hub"


def hub_endpoint() -> str | None:
    """HF_ENDPOINT (a mirror), read now, not when huggingface_hub was first imported."""
    return os.environ.get("HF_ENDPOINT") or None


@dataclass(frozen=True)
class HubRequest:
    """What is being fetched, for the messages: the recipe file and key that named it, and how to fetch it by hand."""

    recipe_file: str
    key: str
    repo: str
    revision: str | None
    kind: str
    """"repository" (a model) or "dataset repository"."""
    cache: Path
    fetch_by_hand: str
    """The `hf download …` line that fetches the same files where there is network."""
    local_instead: str
    """What the key may name instead of the hub (a local directory, local files)."""

    def named(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


@contextmanager
def hub_errors(request: HubRequest) -> Iterator[None]:
    """Run hub calls; every way they fail becomes one line naming what to do (ConfigError on request.key)."""
    import httpx2  # huggingface_hub's HTTP client: a refused connection reaches its API calls as this
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
        return
    except GatedRepoError:
        message = f"{request.repo} is gated: accept its terms on its Hugging Face page, then {TOKEN_HINT}"
    except RevisionNotFoundError:
        message = f"{request.repo} has no revision {request.revision!r}: name a branch, tag or commit it has"
    except RepositoryNotFoundError:
        message = f"no {request.kind} {request.repo} on the Hugging Face hub (if it is private, {TOKEN_HINT})"
    except (LocalEntryNotFoundError, httpx2.TransportError):
        message = (f"{request.named()} is not in the Hugging Face cache {request.cache} and the hub cannot be reached: "
                   f"download it where there is network (`{request.fetch_by_hand}` with HF_HOME={request.cache.parent}) "
                   f"or {request.local_instead}")
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        message = f"the Hugging Face hub answered {status} for {request.named()}" + (
            f": {TOKEN_HINT}" if status == 401 else "")
    except OSError as err:
        message = f"cannot write the Hugging Face cache {request.cache}: {err.strerror or err}"
    raise ConfigError(request.recipe_file, request.key, message)
