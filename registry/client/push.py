"""Push: a validated delta published as the next version of a repository — the repository (and
its base) made sure of before a byte is sent, the storage form staged once, the bytes sent where
the registry says (resuming an interrupted upload), then `complete`.

    result = push(api, "math.bdelta", "acme/math", tags=["prod"])
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from codec.errors import BaseMismatchError, BaseNameError
from codec.format import DeltaFile
from codec.storage import BlobInfo
from registry.client import transfer
from registry.client.errors import BaseNotRegisteredError, NetworkError, TransferInterruptedError
from registry.client.http import api_error, netloc, s3_error
from registry.client.refs import Ref
from registry.client.types import Progress, PushResult, RepoInfo, Silent, VersionInfo, build, json_dict
from registry.common import names
from registry.common.errors import (
    BaseMismatchUploadError,
    ConflictError,
    DigestMismatchError,
    InvalidRequestError,
    InvalidUploadError,
    NotFoundError,
    RegistryError,
)

if TYPE_CHECKING:
    from registry.client.api import RegistryApi


def settable_tag(tag: str) -> str:
    names.check_tag(tag)
    if tag in names.RESERVED_TAGS:
        raise InvalidRequestError(
            f"tag {tag!r} is maintained by the registry (it follows the newest version)"
        )
    return tag


def push(
    api: RegistryApi,
    path: str | os.PathLike[str],
    repo: str,
    *,
    base: str | None = None,
    base_path: str | os.PathLike[str] | None = None,
    tags: list[str] | tuple[str, ...] = (),
    description: str = "",
    visibility: str = "public",
    progress: Progress | None = None,
) -> PushResult:
    """See `RegistryApi.push`."""
    started = time.perf_counter()
    progress = progress or Silent()
    path = Path(path)
    namespace, name = names.parse_repo_name(repo)
    tags = [settable_tag(t) for t in tags]
    with DeltaFile.open(path) as delta:  # every check a reader makes, before any network traffic
        meta = dict(delta.metadata)
    repo_info, created = _repo_for_push(
        api,
        f"{namespace}/{name}",
        meta,
        base=base,
        base_path=base_path,
        description=description,
        visibility=visibility,
    )
    target = f"{api.endpoint} {repo_info.full_name}"
    declared = {"description": description, "fidelity": json_dict(meta.get("fidelity"))}
    with api.cache.push_state(path) as state:
        progress.start("compressing", None)
        info = state.prepare(path)
        upload, resumed, version = _open_upload(api, state, target, repo_info.full_name, info, declared)
        # A saved upload that `complete` published now (201) was finished by this run; one that
        # answers 200 had been published by an earlier run whose answer was lost.
        earlier = version is not None and version[1]
        version = version[0] if version is not None else None
        sent = skipped = 0
        if version is None:
            if not upload["exists"]:
                staged = state.stage(path)
                if staged != info:  # the storage form came out different (another zstd): declare again
                    _abort_upload(api, upload["id"])
                    state.forget_upload(target)
                    info = staged
                    upload, resumed, _ = _open_upload(api, state, target, repo_info.full_name, info, declared)
                if not upload["exists"]:
                    sent, skipped = _send(api, upload, state.staged_path, info, progress)
            progress.start("verifying (registry)", None)
            try:
                version = _complete(api, upload, state, target)
            finally:
                progress.stop()
        state.finish(target)
    for tag in tags:
        api.set_tag(repo_info.full_name, tag, version.number)
    if tags:
        version = api.version(Ref(namespace, name, version=version.number))
    return PushResult(
        version=version,
        deduplicated=bool(upload and upload["exists"]),
        sent_bytes=sent,
        resumed=resumed,
        skipped_parts=skipped,
        created_repo=created,
        tags=tags,
        seconds=time.perf_counter() - started,
        already_published=upload is None and earlier,
        completed_earlier_upload=upload is None and not earlier,
    )


def _repo_for_push(
    api: RegistryApi, repo: str, meta: dict, *, base: str | None, base_path, description: str, visibility: str
) -> tuple[RepoInfo, bool]:
    fingerprint = meta["base_fingerprint"]
    try:
        info, created = api.repo(repo), False
    except NotFoundError:
        base_name = base or _recorded_base_name(meta)
        try:
            base_info = api.base(base_name)
        except NotFoundError:
            if base_path is None:
                raise BaseNotRegisteredError(
                    f"base model {base_name!r} is not registered; register it, or give its local checkpoint "
                    "to register it with",
                    base_name=base_name,
                ) from None
            # The checkpoint must be the delta's base before anything is registered under that name.
            base_info, _ = api.register_base_from_checkpoint(
                base_name, base_path, expected_fingerprint=meta["base_fingerprint"]
            )
        check_fingerprint(None, base_info.name, base_info.fingerprint, meta)
        try:
            info = api.create_repo(repo, base=base_info.name, description=description, visibility=visibility)
            created = True
        except ConflictError:  # a concurrent push created it first
            info, created = api.repo(repo), False
    if base is not None and base != info.base:
        raise BaseMismatchError(
            f"{repo} holds deltas of base {info.base!r}, not {base!r}",
            expected=info.base_fingerprint,
            actual=fingerprint,
        )
    check_fingerprint(repo, info.base, info.base_fingerprint, meta)
    return info, created


def _recorded_base_name(meta: dict) -> str:
    recorded = meta["base_model"]
    try:
        return names.parse_base_name(recorded)
    except InvalidRequestError:
        raise BaseNameError(
            f"the delta records its base as {recorded!r}, which is not a registry name (org/model); "
            "name the base the repository is for"
        ) from None


def check_fingerprint(repo: str | None, base_name: str, fingerprint: str, meta: dict) -> None:
    """The delta must be of the base `base_name` as registered: that of the existing repository
    `repo`, or (repo None: about to be created) the one the push names."""
    if meta["base_fingerprint"] == fingerprint:
        return
    held = f"{repo} holds deltas of base {base_name!r}" if repo else f"base {base_name!r} is registered"
    recorded = meta["base_model"]
    made_for = "another checkpoint of that name" if recorded == base_name else f"base {recorded!r}"
    raise BaseMismatchError(
        f"{held} with fingerprint {fingerprint}, but this delta was made for {made_for} "
        f"(fingerprint {meta['base_fingerprint']})",
        expected=fingerprint,
        actual=meta["base_fingerprint"],
    )


def _open_upload(
    api: RegistryApi, state, target: str, repo: str, info: BlobInfo, declared: dict
) -> tuple[dict | None, bool, tuple[VersionInfo, bool] | None]:
    """The pending upload of this file to this repository if one survives (resume), else a new
    one: (upload, resumed, None). When the saved upload can be completed at once (an earlier run
    sent every byte), no upload but its version and whether an earlier run had published it
    (it lost the answer of `complete`): (None, True, (version, earlier))."""
    upload_id = state.upload_id(target)
    if upload_id:
        try:
            return api.http.request("GET", f"/v1/uploads/{upload_id}").json(), True, None
        except (NotFoundError, ConflictError):
            pass
        try:  # completing a published upload again only names its version
            answer, repeated = api.http.post_once_more_if_lost(f"/v1/uploads/{upload_id}/complete")
            earlier = answer.status_code == 200 and not repeated
            return None, True, (build(VersionInfo, answer.json()), earlier)
        except (NotFoundError, ConflictError):
            state.forget_upload(target)  # aborted or collected meanwhile
    body = {
        "digest": info.digest,
        "size": info.size,
        "raw_digest": info.raw_digest,
        "raw_size": info.raw_size,
        **declared,
    }
    upload = api.http.request("POST", f"/v1/repos/{repo}/uploads", json=body).json()
    state.remember_upload(target, upload["id"])
    return upload, False, None


def _abort_upload(api: RegistryApi, upload_id: str) -> None:
    with contextlib.suppress(RegistryError, NetworkError):
        api.http.request("DELETE", f"/v1/uploads/{upload_id}")


def _send(
    api: RegistryApi, upload: dict, staged: Path, info: BlobInfo, progress: Progress
) -> tuple[int, int]:
    """Send the staged bytes where the registry said; returns (bytes sent, parts skipped)."""
    http = api.http
    method = upload["method"]
    if method == "stream":  # through the registry
        progress.start("uploading", info.size)
        with http.network("the upload"):
            r = transfer.put_range(
                http.api, upload["upload_url"], staged, 0, info.size, advance=progress.advance
            )
        if r.is_error:
            raise api_error(r)
        return info.size, 0
    if method == "s3-put":  # straight to the blob store
        url = upload["upload_url"]
        progress.start("uploading", info.size)
        with http.blob_store_network(url, "the upload", upload=True):
            r = transfer.put_range(http.blobs, url, staged, 0, info.size, advance=progress.advance)
        if r.is_error:
            raise NetworkError(
                f"the blob store at {netloc(url)} refused the upload: HTTP {r.status_code} {s3_error(r)}"
            )
        return info.size, 0
    parts = upload["parts"]
    todo = [p for p in parts if not p.get("received")]
    done_bytes = sum(p["size"] for p in parts if p.get("received"))
    progress.start("uploading", info.size, completed=done_bytes)
    finished: list[int] = []
    try:
        transfer.upload_parts(
            http.blobs,
            staged,
            todo,
            concurrency=api.upload_concurrency,
            advance=progress.advance,
            on_part=lambda p: finished.append(p["number"]),
        )
    except (NetworkError, httpx.TransportError) as exc:
        if isinstance(exc, httpx.TransportError):
            exc = http.blob_store_error(exc, netloc(todo[0]["url"]), "the upload", upload=True, brief=True)
        stored = len(parts) - len(todo) + len(finished)
        raise TransferInterruptedError(
            f"push interrupted with {stored} of {len(parts)} parts stored ({exc}); "
            "run the same command again to send only the missing parts"
        ) from None
    return sum(p["size"] for p in todo), len(parts) - len(todo)


def _complete(api: RegistryApi, upload: dict, state, target: str) -> VersionInfo:
    try:
        return build(VersionInfo, api.http.post_once_more_if_lost(upload["complete_url"])[0].json())
    except (DigestMismatchError, InvalidUploadError, BaseMismatchUploadError):
        state.forget_upload(target)  # the registry dropped the upload and its bytes
        state.discard_staged()
        raise
    except NotFoundError:
        state.forget_upload(target)
        raise NotFoundError(f"upload {upload['id']} is gone (expired or collected); push again") from None
