"""Model references that name a Hugging Face Hub repository (`org/name`, `org/name@revision`),
resolved to a snapshot directory in the Hub's own local cache through `huggingface_hub`.

    model = resolve_model("meta-llama/Llama-2-7b-hf@main")   # a local path always wins
    model.path, model.source.commit

Honours HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, and HF_HUB_OFFLINE / DELTACTL_OFFLINE
(nothing touches the network). Only safetensors weights, their index, the config and tokenizer
files are fetched: deltastore reads no pickled `.bin`/`.pth` weights.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, HubUnavailableError, ModelNotFoundError

#: `org/name` with an optional `@revision` (a branch, tag or commit): the Hub's repo id grammar.
HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})(?:@(?P<revision>[A-Za-z0-9_./-]{1,200}))?"
)

#: The files a checkpoint needs: weights as safetensors, the config, generation config and tokenizer.
FETCHED = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
]
PICKLED_WEIGHTS = (".bin", ".pth", ".pt", ".ckpt")

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from on the Hub: the id, the revision asked for, the commit it resolved to."""

    repo_id: str
    revision: str
    commit: str

    def to_json(self) -> str:
        return json.dumps(
            {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}, sort_keys=True
        )


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    source: ModelSource | None  # None: a local path


def offline() -> bool:
    """HF_HUB_OFFLINE or DELTACTL_OFFLINE set to a true value: never touch the network."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "DELTACTL_OFFLINE"))


def hub_cache_dir() -> Path:
    """The Hub cache directory, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `spec` is spelled like a Hub id, else None."""
    m = HUB_ID.fullmatch(spec)
    if m is None or spec.startswith((".", "/", "~")):
        return None
    return m["repo"], m["revision"]


def resolve_model(spec: str | os.PathLike[str], *, revision: str | None = None) -> ResolvedModel:
    """A local path as it is; otherwise a Hub id (`org/name[@rev]`, or `revision=`) resolved to its
    snapshot directory in the Hub cache, downloading what is missing unless offline."""
    path = Path(spec)
    if path.exists():
        if revision is not None:
            raise CheckpointError(f"{spec}: a revision applies to a Hub model id, not to a local path")
        return ResolvedModel(path, None)
    parsed = parse_hub_id(str(spec))
    if parsed is None:
        if revision is not None:
            raise CheckpointError(f"{spec}: not a Hub model id (org/name), so a revision cannot apply")
        return ResolvedModel(path, None)  # a missing local path: the checkpoint reader says so
    repo_id, at_revision = parsed
    if at_revision is not None and revision is not None and at_revision != revision:
        raise CheckpointError(f"{spec}: two revisions given ({at_revision!r} and --revision {revision!r})")
    wanted = revision or at_revision or "main"
    snapshot = _snapshot(repo_id, wanted)
    if not any(snapshot.glob("*.safetensors")):
        _refuse_pickled(repo_id, wanted, snapshot)
    return ResolvedModel(snapshot, ModelSource(repo_id, wanted, snapshot.name))


def _snapshot(repo_id: str, revision: str) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:  # pragma: no cover - a dependency of deltastore, normally present
        raise CheckpointError(f"{repo_id}: reading models from the Hub needs huggingface_hub") from None
    cache = hub_cache_dir()
    endpoint = os.environ.get("HF_ENDPOINT") or None
    where = endpoint or "the Hugging Face Hub"
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            endpoint=endpoint,
            token=os.environ.get("HF_TOKEN") or None,
            local_files_only=offline(),
            allow_patterns=FETCHED,
        )
    except hub_errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no revision {revision!r} on {where}") from None
    except hub_errors.GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id}: gated on {where}; accept its terms and set HF_TOKEN to a token that may read it"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id}: no such model on {where} (nor a local path of that name; "
            "a private model needs HF_TOKEN)"
        ) from None
    except hub_errors.LocalEntryNotFoundError:
        if offline():
            raise ModelNotFoundError(
                f"{repo_id}@{revision}: not in the Hub cache at {cache}, and offline mode is on "
                "(HF_HUB_OFFLINE / DELTACTL_OFFLINE): download it once without offline mode"
            ) from None
        raise HubUnavailableError(
            f"{repo_id}@{revision}: cannot reach {where}, and the model is not in the Hub cache at {cache}"
        ) from None
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        raise HubUnavailableError(
            f"{repo_id}@{revision}: {where} failed: {str(exc).splitlines()[0]}"
        ) from None
    return Path(folder)


def _refuse_pickled(repo_id: str, revision: str, snapshot: Path) -> None:
    """No safetensors in the snapshot: say whether the repository holds only pickled weights."""
    names = _repo_files(repo_id, revision) or [p.name for p in snapshot.iterdir()]
    pickled = sorted(n for n in names if n.endswith(PICKLED_WEIGHTS))
    if pickled:
        raise CheckpointError(
            f"{repo_id}@{revision}: has only pickled PyTorch weights ({', '.join(pickled[:3])}); deltastore "
            "reads safetensors only (convert with transformers' save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"{repo_id}@{revision}: holds no *.safetensors weights")


def _repo_files(repo_id: str, revision: str) -> list[str]:
    if offline():
        return []
    try:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN") or None)
        return api.list_repo_files(repo_id, revision=revision)
    except Exception:  # noqa: BLE001 - only used to word an error that is raised anyway
        return []
