"""Push: a validated delta published as the next version of a repository — the repository (and
its base) made sure of before a byte is sent, then the storage form made, hashed and sent where
the registry says in one pass (parts uploaded in parallel as they are made; a resumed upload
sends only the parts the store lacks), then `complete` naming its digests and sizes. Digests an
earlier push of the same file recorded let the registry answer `exists` up front (dedup).

    result = push(api, "math.bdelta", "acme/math", tags=["prod"])
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from codec.errors import BaseMismatchError, BaseNameError
from codec.files import CHUNK
from codec.format import DeltaFile
from codec.storage import BlobInfo
from registry.client import transfer
from registry.client.errors import BaseNotRegisteredError, NetworkError, TransferInterruptedError
from registry.client.http import api_error, netloc, s3_error
from registry.client.refs import Ref
from registry.client.transfer import StorageForm, part_etag
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
    UploadTooLargeError,
)

if TYPE_CHECKING:
    from registry.client.api import RegistryApi


#: The registry's verdicts on an upload's bytes; each drops the upload.
_REFUSED = (InvalidUploadError, DigestMismatchError, BaseMismatchUploadError, UploadTooLargeError)


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
        known = state.blob  # an earlier push of this very file: the registry may hold its bytes
        full_name = repo_info.full_name
        upload, resumed, version = _open_upload(api, state, target, full_name, path, known, declared)
        # A saved upload that `complete` published now (201) was finished by this run; one that
        # answers 200 had been published by an earlier run whose answer was lost.
        earlier = version is not None and version[1]
        version = version[0] if version is not None else None
        sent = skipped = 0
        if version is None:
            info, parts = known, None
            if not upload["exists"]:
                try:
                    info, sent, skipped, parts = _send(api, upload, path, progress)
                except _REFUSED:
                    state.forget_upload(target)  # refused as they arrived: the registry dropped it
                    raise
                state.remember_blob(info)
                if upload["declared"] is not None and upload["declared"] != info:
                    # Declared with digests an earlier push recorded, but the storage form came out
                    # different (another zstd): that upload cannot be completed; send it streamed.
                    _abort_upload(api, upload["id"])
                    state.forget_upload(target)
                    upload, resumed, _ = _open_upload(api, state, target, full_name, path, None, declared)
                    info, sent, skipped, parts = _send(api, upload, path, progress)
            progress.start("verifying (registry)", None)
            try:
                version = _complete(api, upload, state, target, info, parts)
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
    api: RegistryApi, state, target: str, repo: str, path: Path, known: BlobInfo | None, declared: dict
) -> tuple[dict | None, bool, tuple[VersionInfo, bool] | None]:
    """The pending upload of this file to this repository if one survives (resume), else a new
    one, declared with the digests `known` from an earlier push (the registry may hold those
    bytes: `exists`) or with the raw size alone (streamed): (upload, resumed, None); the upload
    dict carries what it was declared with as "declared" (None: streamed). When the saved
    upload can be completed at once (an earlier run published it but lost the answer), no
    upload but its version and whether an earlier run had published it: (None, True, (version,
    earlier))."""
    upload_id = state.upload_id(target)
    if upload_id:
        try:
            upload = api.http.request("GET", f"/v1/uploads/{upload_id}").json()
            return {**upload, "declared": state.upload_declared(target)}, True, None
        except (NotFoundError, ConflictError):
            pass
        try:  # completing a published upload again only names its version
            # The digests of what an earlier run sent, if it got that far (a streamed upload needs them).
            named = asdict(known) if known is not None else None
            complete = f"/v1/uploads/{upload_id}/complete"
            answer, repeated = api.http.post_once_more_if_lost(complete, json=named)
            earlier = answer.status_code == 200 and not repeated
            return None, True, (build(VersionInfo, answer.json()), earlier)
        except (NotFoundError, ConflictError, InvalidRequestError):
            state.forget_upload(target)  # aborted or collected meanwhile, or never sent whole
    body = {"raw_size": os.stat(path).st_size, **declared}
    if known is not None:
        body.update(asdict(known))
    upload = api.http.request("POST", f"/v1/repos/{repo}/uploads", json=body).json()
    state.remember_upload(target, upload["id"], known)
    return {**upload, "declared": known}, False, None


def _abort_upload(api: RegistryApi, upload_id: str) -> None:
    with contextlib.suppress(RegistryError, NetworkError):
        api.http.request("DELETE", f"/v1/uploads/{upload_id}")


def _send(
    api: RegistryApi, upload: dict, path: Path, progress: Progress
) -> tuple[BlobInfo, int, int, list[dict] | None]:
    """Make the storage form of `path` and send it where the registry said, as it is made;
    returns its digests and sizes, the bytes sent, the parts skipped (held already) and, for a
    multipart upload, each part's number and ETag."""
    http = api.http
    method = upload["method"]
    raw_size = os.stat(path).st_size
    progress.start("uploading", raw_size)  # compressed as it goes; stored and raw sizes differ little
    if method in ("stream", "s3-put"):
        if method == "stream":  # through the registry, which verifies the bytes as they arrive
            form = StorageForm(path, part_size=CHUNK)
            url, client, size = upload["upload_url"], http.api, None
        else:  # one presigned PUT (small deltas: the registry's multipart threshold bounds them)
            form = StorageForm(path, part_size=1 << 62)
            url, client = upload["upload_url"], http.blobs
            data = b"".join(form.parts())
            size = len(data)

        def content(advance, sent):
            chunks = form.parts() if method == "stream" else [data]
            for buf in chunks:
                sent[0] += len(buf)
                advance(len(buf))
                yield buf

        if method == "stream":
            with http.network("the upload"):
                r = transfer.put_content(client, url, content, size=None, advance=progress.advance)
            if r.is_error:
                raise api_error(r)
        else:
            with http.blob_store_network(url, "the upload", upload=True):
                r = transfer.put_content(client, url, content, size=size, advance=progress.advance)
            if r.is_error:
                raise NetworkError(
                    f"the blob store at {netloc(url)} refused the upload: HTTP {r.status_code} {s3_error(r)}"
                )
        return form.info, form.info.size, 0, None
    form = StorageForm(path, part_size=upload["part_size"])
    held = {p["number"]: (p["size"], p["etag"]) for p in upload.get("received_parts", [])}
    urls = _PartUrls(api, upload, batch=max(16, 2 * api.upload_concurrency))
    finished: list[int] = []
    try:
        sent, skipped, etags = transfer.upload_parts(
            http.blobs,
            form.parts(),
            url_for=urls.get,
            held=lambda number, data: _held_etag(held.get(number), data),
            concurrency=api.upload_concurrency,
            advance=progress.advance,
            on_part=finished.append,
        )
    except (NetworkError, httpx.TransportError) as exc:
        if isinstance(exc, httpx.TransportError):
            exc = http.blob_store_error(exc, netloc(urls.last), "the upload", upload=True, brief=True)
        stored = len(held) + len(finished)
        raise TransferInterruptedError(
            f"push interrupted with {stored} parts stored ({exc}); "
            "run the same command again to send only the missing parts"
        ) from None
    parts = [{"number": n, "etag": etags[n]} for n in sorted(etags)]
    # Reported at `complete`: the registry checks them against the part objects it read.
    return form.info, sent, skipped, parts if all(p["etag"] for p in parts) else None


def _held_etag(held: tuple[int, str] | None, data: bytes) -> str | None:
    """The ETag of a part the store holds already with exactly these bytes (size and MD5)."""
    return held[1] if held is not None and held == (len(data), part_etag(data)) else None


class _PartUrls:
    """Presigned part URLs of a multipart upload, asked for in batches as the parts are made."""

    def __init__(self, api: RegistryApi, upload: dict, *, batch: int):
        self.api, self.upload, self.batch = api, upload, batch
        self.urls: dict[int, str] = {}
        self.last = ""

    def get(self, number: int) -> str:
        if number not in self.urls:
            answer = self.api.http.request(
                "GET", self.upload["parts_url"], params={"first": number, "count": self.batch}
            ).json()
            self.urls.update((p["number"], p["url"]) for p in answer["parts"])
        self.last = self.urls.pop(number)
        return self.last


def _complete(
    api: RegistryApi, upload: dict, state, target: str, info: BlobInfo, parts: list[dict] | None
) -> VersionInfo:
    body = {**asdict(info), **({"parts": parts} if parts else {})}
    try:
        answer, _ = api.http.post_once_more_if_lost(upload["complete_url"], json=body)
        return build(VersionInfo, answer.json())
    except (DigestMismatchError, InvalidUploadError, BaseMismatchUploadError):
        state.forget_upload(target)  # the registry dropped the upload and its bytes
        raise
    except NotFoundError:
        state.forget_upload(target)
        raise NotFoundError(f"upload {upload['id']} is gone (expired or collected); push again") from None
