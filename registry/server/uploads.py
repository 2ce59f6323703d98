"""The two-phase push protocol: an upload is declared (digest, sizes), its bytes land in the blob
store's staging area, and `complete` verifies them and publishes the version in one transaction.

    upload, target = pushes.create(namespace="acme", name="math", declared=..., principal=p)
    ... client sends the bytes to `target` ...
    version, published = pushes.complete(upload_id=upload.id, principal=p)
    # completing it again: the same version, published False
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError

from codec.container import Header
from registry.common.errors import (
    BaseMismatchUploadError,
    ConflictError,
    DigestMismatchError,
    InvalidUploadError,
    NotFoundError,
    RegistryError,
    SizeMismatchError,
    UploadTooLargeError,
)
from registry.server import crud
from registry.server.auth import Principal
from registry.server.blobstores import BlobStore, UploadRef, UploadTarget
from registry.server.db import Database
from registry.server.metrics import RegistryMetrics
from registry.server.models import Repository, Upload, Version, utcnow
from registry.server.settings import Settings
from registry.server.verify import Declared, read_header, verify_stream


@dataclass(frozen=True)
class UploadRequest:
    digest: str
    size: int
    raw_digest: str
    raw_size: int
    description: str = ""
    fidelity: dict | None = None


class PushService:
    def __init__(
        self, *, db: Database, store: BlobStore, settings: Settings, metrics: RegistryMetrics | None = None
    ):
        self.db, self.store, self.settings = db, store, settings
        self.metrics = metrics or RegistryMetrics()

    # --- phase 1: declare ------------------------------------------------------------------
    def create(
        self, *, namespace: str, name: str, request: UploadRequest, principal: Principal
    ) -> tuple[Upload, UploadTarget]:
        principal.require("write", namespace)
        limit = self.settings.max_upload_bytes
        if request.size > limit:
            raise UploadTooLargeError(
                f"upload of {request.size} bytes exceeds this registry's limit of {limit} bytes"
            )
        if request.raw_size > self.settings.max_raw_bytes:
            raise UploadTooLargeError(
                f"delta of {request.raw_size} bytes (decompressed) exceeds "
                f"this registry's limit of {self.settings.max_raw_bytes} bytes"
            )
        with self.db.read() as session:
            crud.get_repo(session, namespace=namespace, name=name)
            blob = crud.get_blob(session, digest=request.digest)
        upload_id = uuid.uuid4().hex
        if blob is not None:
            if (blob.size, blob.raw_digest, blob.raw_size) != (
                request.size,
                request.raw_digest,
                request.raw_size,
            ):
                raise DigestMismatchError(
                    f"blob {request.digest} is stored with size {blob.size}, "
                    f"raw digest {blob.raw_digest} and raw size "
                    f"{blob.raw_size}; the upload declared {request.size}, "
                    f"{request.raw_digest}, {request.raw_size}"
                )
            target = UploadTarget(method="exists")  # dedup: the client skips sending the bytes
        else:
            target = self.store.begin_upload(upload_id, request.size, request.digest)
        try:
            with self.db.write() as session:
                repo = crud.get_repo(session, namespace=namespace, name=name)
                upload = crud.create_upload(
                    session,
                    upload_id=upload_id,
                    repo=repo,
                    digest=request.digest,
                    size=request.size,
                    raw_digest=request.raw_digest,
                    raw_size=request.raw_size,
                    method=target.method,
                    multipart_id=target.multipart_id,
                    part_size=target.part_size,
                    description=request.description,
                    fidelity=request.fidelity,
                    actor=principal.name,
                    expires_at=utcnow() + dt.timedelta(seconds=self.settings.upload_ttl_seconds),
                )
        except BaseException:
            if target.method != "exists":
                self.store.discard(UploadRef(upload_id, request.digest, target.multipart_id))
            raise
        return upload, target

    def resume(self, *, upload_id: str, principal: Principal) -> tuple[Upload, UploadTarget]:
        """A pending upload with fresh URLs for its bytes and the parts the store already holds."""
        upload = self.get(upload_id=upload_id, principal=principal)
        if upload.method == "exists":
            return upload, UploadTarget(method="exists")
        return upload, self.store.resume_upload(
            _ref(upload), method=upload.method, size=upload.size, part_size=upload.part_size
        )

    def get(self, *, upload_id: str, principal: Principal) -> Upload:
        with self.db.read() as session:
            upload = crud.get_upload(session, upload_id=upload_id)
        principal.require("write", upload.version.repository.namespace)
        return upload

    # --- phase 2: complete -----------------------------------------------------------------
    def complete(self, *, upload_id: str, principal: Principal) -> tuple[Version, bool]:
        """Verify the upload's bytes and publish them as the repository's next version. Returns the
        version and whether this call published it: completing an upload that was already
        published (a retry whose first answer was lost) returns that same version."""
        try:
            upload = self.get(upload_id=upload_id, principal=principal)
        except NotFoundError:
            return self._published(upload_id, principal), False
        repo = upload.version.repository
        try:
            header, store_key = self._verify(upload, repo)
        except (DigestMismatchError, InvalidUploadError, BaseMismatchUploadError) as exc:
            self._abandon(upload)
            self.metrics.pushes.labels(exc.code).inc()
            raise
        except ConflictError as exc:
            # A concurrent `complete` of this upload took its staged bytes; if it has published
            # them, that is the answer.
            return self._published(upload_id, principal, otherwise=exc), False
        meta = header.metadata
        try:
            with self.db.write() as session:
                locked = crud.get_upload(session, upload_id=upload_id, for_update=True)
                version = crud.publish_version(
                    session,
                    upload=locked,
                    store_key=store_key,
                    codec=meta["codec"],
                    dtype=meta["dtype"],
                    bits=_int(meta.get("x-planes")),
                    size_ratio=_ratio(meta.get("x-finetuned-bytes"), upload.raw_size),
                    fidelity=_json(meta.get("fidelity")) or upload.version.fidelity,
                    header_metadata=dict(meta),
                    actor=principal.name,
                )
        except NotFoundError:
            return self._published(upload_id, principal), False  # a concurrent `complete` published it first
        except IntegrityError:
            # The blob row a deduplicated upload relied on was collected in between.
            self._abandon(upload)
            raise ConflictError(
                f"blob {upload.digest} was garbage-collected during the push; push again"
            ) from None
        self.metrics.pushes.labels("ready").inc()
        self.metrics.upload_bytes.inc(upload.size)
        return version, True

    def _published(
        self, upload_id: str, principal: Principal, otherwise: RegistryError | None = None
    ) -> Version:
        """The version `upload_id` was published as; else `otherwise` (default: not found) is raised."""
        with self.db.read() as session:
            version = crud.published_version(session, upload_id=upload_id)
        if version is None:
            raise otherwise or NotFoundError(
                f"upload {upload_id} does not exist (aborted or expired, or its version was deleted)"
            )
        principal.require("write", version.repository.namespace)
        return version

    def _verify(self, upload: Upload, repo: Repository) -> tuple[Header, str | None]:
        """Check the upload's bytes and their base; returns their header and, for new bytes
        (promoted to a blob only once they passed), their blob key."""
        declared = Declared(upload.digest, upload.size, upload.raw_digest, upload.raw_size)
        if upload.method == "exists":
            with self.db.read() as session:
                blob = crud.get_blob(session, digest=upload.digest)
            if blob is None:
                self._abandon(upload)
                raise ConflictError(f"blob {upload.digest} was garbage-collected during the push; push again")
            with self.store.open_blob(blob.store_key) as fh:
                header, _ = read_header(fh, blob.raw_size)
            _check_base(header, repo)
            return header, None
        ref = _ref(upload)
        if upload.method == "s3-multipart":
            self.store.finish_parts(ref, expected_parts=max(1, math.ceil(upload.size / upload.part_size)))
        with self.store.open_staged(ref) as staged:
            if staged.size != upload.size:
                raise SizeMismatchError(f"received {staged.size} bytes but the upload declared {upload.size}")
            limit = self.settings.max_header_bytes
            header, _ = verify_stream(staged.stream, declared, max_header_bytes=limit)
        _check_base(header, repo)
        return header, self.store.promote(ref, staged.token)

    def abort(self, *, upload_id: str, principal: Principal) -> None:
        self._abandon(self.get(upload_id=upload_id, principal=principal))

    def _abandon(self, upload: Upload) -> None:
        """Forget a failed upload: its staged bytes and its invisible pending version."""
        if upload.method != "exists":
            try:
                self.store.discard(_ref(upload))
            except RegistryError:
                pass  # whatever stays behind has no row any more: GC removes it after the grace period
        with self.db.write() as session:
            crud.delete_upload(session, upload=upload)


def _check_base(header: Header, repo: Repository) -> None:
    meta, base = header.metadata, repo.base_model
    if meta["base_fingerprint"] != base.fingerprint:
        made_for = (
            "another checkpoint of that name"
            if meta["base_model"] == base.name
            else f"base {meta['base_model']!r}"
        )
        raise BaseMismatchUploadError(
            f"{repo.full_name} holds deltas of base {base.name!r} (fingerprint {base.fingerprint}); "
            f"this upload was made for {made_for} (fingerprint {meta['base_fingerprint']})"
        )


def _ref(upload: Upload) -> UploadRef:
    return UploadRef(upload_id=upload.id, digest=upload.digest, multipart_id=upload.multipart_id)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _ratio(finetuned_bytes: str | None, raw_size: int) -> float | None:
    n = _int(finetuned_bytes)
    return n / raw_size if n and raw_size else None


def _json(value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None
