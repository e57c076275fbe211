"""Models and corpus files named on the Hugging Face Hub, fetched into the user's hub cache.

A model is `ORG/NAME[@REVISION]`, or `hf:ORG/NAME[@REVISION]`; a corpus file of a dataset
repository is `hf-dataset:ORG/NAME/path/in/repo[@REVISION]` (REVISION: a branch, tag or commit;
the default branch without it). Callers try a local path first: an existing path always wins
over a hub name. huggingface_hub does the fetching as it does for transformers: it honours
HF_HOME / HF_HUB_CACHE (where the cache is), HF_TOKEN (gated and private repositories),
HF_ENDPOINT and HF_HUB_OFFLINE=1 (the cache alone, no request), and draws its own progress bars.
Every error of its that a user can fix is one JaxcritError line (the ERRORS table).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
from pathlib import Path
from typing import Iterator

from jaxcrit.errors import JaxcritError

MODEL_PREFIX = "hf:"
DATASET_PREFIX = "hf-dataset:"

# What jaxcrit reads of a model repository (convert/hf.py, convert/safetensors_io.py, convert/tokenizer.py):
# nothing else is fetched. Pickled weights (.bin, .pt) never are: jaxcrit does not unpickle.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json",
               "model*.safetensors")
WEIGHTS = "model*.safetensors"
BARS_AFTER = 0.5   # seconds

OFFLINE = ("not in the hub cache ({cache}) and the Hub cannot be reached (HF_HUB_OFFLINE=1 or no network); "
           "run once with network access to fetch it")


@dataclasses.dataclass(frozen=True)
class HubName:
    """A repository on the Hub, at a revision, and for a corpus the file in it."""
    repo: str                     # ORG/NAME
    revision: str | None = None   # None: the default branch
    repo_type: str = "model"      # or "dataset"
    filename: str | None = None   # a dataset file's path inside the repository

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        if self.repo_type == "dataset":
            return f"{DATASET_PREFIX}{self.repo}/{self.filename}{at}"
        return f"{self.repo}{at}"


def _error_table() -> dict[type[BaseException], str]:
    """huggingface_hub's exception classes -> the line each becomes; a class's closest listed
    ancestor decides (GatedRepoError is a RepositoryNotFoundError, IncompleteSnapshotError a
    LocalEntryNotFoundError). Fields: {name}, {repo}, {revision}, {cache}, {detail}."""
    from huggingface_hub import errors as e
    return {
        e.GatedRepoError: "{name}: a gated repository; accept its terms on its Hub page, then set HF_TOKEN "
                          "to a token of that account (or run `hf auth login`)",
        e.RepositoryNotFoundError: "{name}: no such local path, and no such repository on the Hub; check the name "
                                   "(a private repository needs HF_TOKEN)",
        e.RevisionNotFoundError: "{name}: {repo} has no revision '{revision}'; give a branch, tag or commit of it",
        e.RemoteEntryNotFoundError: "{name}: the repository has no such file at that revision",
        e.DisabledRepoError: "{name}: the repository is disabled on the Hub",
        e.IncompleteSnapshotError: "{name}: the hub cache ({cache}) holds only part of it and the Hub cannot be "
                                   "reached; run once with network access to complete it",
        e.LocalEntryNotFoundError: "{name}: " + OFFLINE,
        e.OfflineModeIsEnabled: "{name}: " + OFFLINE,
        e.HfHubHTTPError: "{name}: the Hub refused the request ({detail}); check HF_TOKEN and HF_ENDPOINT, "
                          "or try again later",
    }


def model_name(source: str) -> HubName | None:
    """The hub model `source` spells (ORG/NAME[@REVISION], optionally after hf:); None when it
    spells none (a local path such as /ckpt or ./ckpt, an embedded name)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    repo, _, revision = source.removeprefix(MODEL_PREFIX).partition("@")
    if repo.count("/") != 1:
        return None
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return HubName(repo, revision or None)


def dataset_name(source: str) -> HubName | None:
    """The hub corpus file `source` spells (hf-dataset:ORG/NAME/path/in/repo[@REVISION]); None
    without the prefix; one error line when the rest is not of that form."""
    if not source.startswith(DATASET_PREFIX):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    body, _, revision = source[len(DATASET_PREFIX):].partition("@")
    org, name, filename = (body.split("/", 2) + ["", ""])[:3]
    try:
        validate_repo_id(f"{org}/{name}")
    except HFValidationError:
        filename = ""
    if not filename:
        raise JaxcritError(f"'{source}': a corpus on the Hub is {DATASET_PREFIX}ORG/NAME/path/in/repo[@REVISION]")
    return HubName(f"{org}/{name}", revision or None, "dataset", filename)


@functools.lru_cache(maxsize=None)
def snapshot(name: HubName) -> Path:
    """The local directory of a model repository at its revision, holding the MODEL_FILES it has;
    fetched into the hub cache once per host (_one_at_a_time) and resolved once per process, so
    every stage of a run reads the same commit."""
    from huggingface_hub import snapshot_download
    with _errors(name), _one_at_a_time(name):
        path = Path(snapshot_download(name.repo, revision=name.revision, allow_patterns=list(MODEL_FILES),
                                      tqdm_class=_bars()))
    if not any(path.glob(WEIGHTS)):
        raise JaxcritError(f"{name}: the repository has no .safetensors weights, and jaxcrit reads no pickled "
                           f".bin/.pt weights; convert it once with transformers: AutoModelForCausalLM.from_pretrained("
                           f"'{name.repo}').save_pretrained(DIR, safe_serialization=True) (and its tokenizer's "
                           "save_pretrained(DIR)), then give DIR")
    return path


@functools.lru_cache(maxsize=None)
def dataset_file(name: HubName) -> Path:
    """The local path of a dataset repository's file at its revision, fetched into the hub cache."""
    from huggingface_hub import hf_hub_download
    with _errors(name), _one_at_a_time(name):
        return Path(hf_hub_download(name.repo, name.filename, repo_type="dataset", revision=name.revision,
                                    tqdm_class=_bars()))


def _bars() -> type:
    """huggingface_hub's progress bars, drawn once a fetch has run BARS_AFTER seconds: a request
    the Hub refuses at once leaves the error line alone on the terminal."""
    from huggingface_hub.utils import tqdm

    class Bars(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{"delay": BARS_AFTER, **kwargs})
    return Bars


@contextlib.contextmanager
def _errors(name: HubName) -> Iterator[None]:
    """huggingface_hub's errors as one JaxcritError line each (the closest class in the table)."""
    from huggingface_hub import constants
    table = _error_table()
    try:
        yield
    except tuple(table) as e:
        line = next(table[k] for k in type(e).__mro__ if k in table)
        detail = next((s for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise JaxcritError(line.format(name=str(name), repo=name.repo, revision=name.revision,
                                       cache=constants.HF_HUB_CACHE, detail=detail.strip())) from None


@contextlib.contextmanager
def _one_at_a_time(name: HubName) -> Iterator[None]:
    """Processes sharing the hub cache (those of one host) fetch a repository one at a time: the
    first fetches it, the next ones find every file cached and fetch nothing. A lock file in the
    cache's .locks/; a cache this process cannot write goes without it."""
    from huggingface_hub import constants
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / f"jaxcrit--{name.repo_type}s--{name.repo.replace('/', '--')}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
