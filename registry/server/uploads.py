"""The two-phase push protocol: an upload is declared (its raw size, and its digests when the
client knows them already), its bytes land in the blob store's staging area as the client makes
them, and `complete` (naming the digests and sizes) verifies them and publishes the version in
one transaction.

    upload, target = pushes.create(namespace="acme", name="math", request=..., principal=p)
    ... client sends the bytes to `target` (multipart: `pushes.part_urls` in batches) ...
    version, published = pushes.complete(upload_id=upload.id, principal=p, named=...)
    # completing it again: the same version, published False
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import uuid
from dataclasses import dataclass
from typing import NoReturn

from sqlalchemy.exc import IntegrityError

from codec.container import Header
from registry.common.errors import (
    BaseMismatchUploadError,
    ConflictError,
    DigestMismatchError,
    InvalidRequestError,
    InvalidUploadError,
    NotFoundError,
    RegistryError,
    SizeMismatchError,
    UploadTooLargeError,
)
from registry.server import crud
from registry.server.auth import Principal
from registry.server.blobstores import BlobStore, UploadPart, UploadRef, UploadTarget
from registry.server.db import Database
from registry.server.metrics import RegistryMetrics
from registry.server.models import Repository, Upload, Version, utcnow
from registry.server.parts import PartChecks
from registry.server.settings import Settings
from registry.server.verify import Declared, Verified, check_named, read_header, verify_stream

#: The most part URLs one request gets.
MAX_PART_BATCH = 100


def stored_size_bound(raw_size: int) -> int:
    """The most bytes one zstd frame of `raw_size` bytes takes (ZSTD_COMPRESSBOUND, plus the
    largest frame header and checksum): a streamed upload's parts never need to hold more."""
    small = (128 << 10) - raw_size >> 11 if raw_size < 128 << 10 else 0
    return raw_size + (raw_size >> 8) + small + 18 + 4


@dataclass(frozen=True)
class UploadRequest:
    raw_size: int
    digest: str | None = None
    size: int | None = None
    raw_digest: str | None = None
    description: str = ""
    fidelity: dict | None = None


class PushService:
    def __init__(
        self, *, db: Database, store: BlobStore, settings: Settings, metrics: RegistryMetrics | None = None
    ):
        self.db, self.store, self.settings = db, store, settings
        self.metrics = metrics or RegistryMetrics()
        # Parts of S3 multipart uploads are verified as they arrive (registry.server.parts).
        self.part_checks = PartChecks(
            store,
            capacity=settings.part_checks,
            max_header_bytes=settings.max_header_bytes,
            still_pending=self._still_pending,
        )

    def close(self) -> None:
        """Stop the part checks of uploads in flight (their `complete` verifies them whole)."""
        self.part_checks.close()

    # --- phase 1: declare ------------------------------------------------------------------
    def create(
        self, *, namespace: str, name: str, request: UploadRequest, principal: Principal
    ) -> tuple[Upload, UploadTarget]:
        principal.require("write", namespace)
        limit = self.settings.max_upload_bytes
        if request.size is not None and request.size > limit:
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
            blob = crud.get_blob(session, digest=request.digest) if request.digest else None
        upload_id = uuid.uuid4().hex
        if blob is not None:
            if any(
                claimed is not None and claimed != held
                for claimed, held in (
                    (request.size, blob.size),
                    (request.raw_digest, blob.raw_digest),
                    (request.raw_size, blob.raw_size),
                )
            ):
                raise DigestMismatchError(
                    f"blob {request.digest} is stored with size {blob.size}, "
                    f"raw digest {blob.raw_digest} and raw size "
                    f"{blob.raw_size}; the upload declared {request.size}, "
                    f"{request.raw_digest}, {request.raw_size}"
                )
            target = UploadTarget(method="exists")  # dedup: the client skips sending the bytes
        else:
            target = self.store.begin_upload(upload_id, self._max_size(request.size, request.raw_size))
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
        self._check_parts(upload)
        return upload, target

    def _check_parts(self, upload: Upload) -> None:
        """Verify a multipart upload's parts as they arrive, in a background pass of this process."""
        if upload.method == "s3-multipart":
            self.part_checks.start(
                _ref(upload),
                raw_size=upload.raw_size,
                part_size=upload.part_size,
                limit=self._max_size(upload.size, upload.raw_size),
                expected_raw_digest=upload.raw_digest,
            )

    def _still_pending(self, upload_id: str) -> bool:
        try:
            with self.db.read() as session:
                crud.get_upload(session, upload_id=upload_id)
        except NotFoundError:
            return False
        except RegistryError:
            return True  # the database unreachable for now: the pass keeps waiting
        return True

    def _max_size(self, size: int | None, raw_size: int) -> int:
        """The most stored bytes an upload may bring: its declared size, else what its raw size
        can compress to, within the registry's limit."""
        return size if size is not None else min(stored_size_bound(raw_size), self.settings.max_upload_bytes)

    def resume(self, *, upload_id: str, principal: Principal) -> tuple[Upload, UploadTarget]:
        """A pending upload with a fresh URL for its bytes, or the parts the store already holds."""
        upload = self.get(upload_id=upload_id, principal=principal)
        if upload.method == "exists":
            return upload, UploadTarget(method="exists")
        target = self.store.resume_upload(_ref(upload), method=upload.method)
        self._check_parts(upload)  # a pass lost with a restart starts again from the first part
        return upload, UploadTarget(
            method=target.method, url=target.url, received=target.received, part_size=upload.part_size
        )

    def part_urls(self, *, upload_id: str, first: int, count: int, principal: Principal) -> list[UploadPart]:
        """Presigned URLs for parts `first` .. `first + count - 1` of a multipart upload, as far as
        the most bytes the upload may bring reach; a first part past them is refused (413), so a
        client cannot grow an upload beyond the registry's limit one part at a time."""
        upload = self.get(upload_id=upload_id, principal=principal)
        if upload.method != "s3-multipart":
            return []  # its bytes go elsewhere (`upload_url`), or nowhere (`exists`)
        if not 1 <= count <= MAX_PART_BATCH:
            raise InvalidRequestError(f"ask for 1 to {MAX_PART_BATCH} part URLs at a time, not {count}")
        max_size = self._max_size(upload.size, upload.raw_size)
        most = max(1, math.ceil(max_size / upload.part_size))
        if first > most:
            raise UploadTooLargeError(
                f"part {first} would begin past byte {max_size}, the most this upload may bring "
                f"(a delta of {upload.raw_size} bytes, within this registry's limit of "
                f"{self.settings.max_upload_bytes} bytes)"
            )
        last = min(first + count - 1, most)
        return self.store.part_urls(_ref(upload), range(first, last + 1))

    def get(self, *, upload_id: str, principal: Principal) -> Upload:
        with self.db.read() as session:
            upload = crud.get_upload(session, upload_id=upload_id)
        principal.require("write", upload.version.repository.namespace)
        return upload

    # --- phase 2: complete -----------------------------------------------------------------
    def complete(
        self,
        *,
        upload_id: str,
        principal: Principal,
        named: Declared | None = None,
        parts: list[tuple[int, str]] | None = None,
    ) -> tuple[Version, bool]:
        """Verify the upload's bytes and publish them as the repository's next version. `named`:
        the digests and sizes the client names now (those it could not declare up front; any it
        declared must be the same). `parts`: (number, ETag) of a multipart upload's parts as the
        client sent them (else the store lists them). Returns the version and whether this call
        published it:
        completing an upload that was already published (a retry whose first answer was lost)
        returns that same version."""
        try:
            upload = self.get(upload_id=upload_id, principal=principal)
        except NotFoundError:
            return self._published(upload_id, principal), False
        repo = upload.version.repository
        declared = _merge(upload, named)
        if declared.size is not None and declared.size > self.settings.max_upload_bytes:
            raise UploadTooLargeError(
                f"upload of {declared.size} bytes exceeds this registry's limit of "
                f"{self.settings.max_upload_bytes} bytes"
            )
        try:
            header, store_key = self._verify(upload, repo, declared, parts)
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
                locked.digest, locked.size = declared.digest, declared.size
                locked.raw_digest = declared.raw_digest
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
        if store_key is not None:
            self._drop_duplicate(declared.digest, store_key)
        if upload.method == "s3-multipart":
            with contextlib.suppress(RegistryError):  # left over, GC removes them after the grace period
                self.store.drop_parts(_ref(upload))
        self.metrics.pushes.labels("ready").inc()
        self.metrics.upload_bytes.inc(declared.size)
        return version, True

    def _drop_duplicate(self, digest: str, store_key: str) -> None:
        """A streamed push of bytes the registry held already (or a concurrent push of the same
        bytes) stored a second copy: the blob row names the first, so the copy goes now rather
        than at the next GC."""
        with self.db.read() as session:
            blob = crud.get_blob(session, digest=digest)
        if blob is not None and blob.store_key != store_key:
            try:
                self.store.delete(store_key)
            except RegistryError:
                pass  # an object without a row: GC removes it after the grace period

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

    def _verify(
        self, upload: Upload, repo: Repository, declared: Declared, parts: list[tuple[int, str]] | None
    ) -> tuple[Header, str | None]:
        """Check the upload's bytes and their base; returns their header and, for new bytes
        (promoted to a blob only once they passed), their blob key."""
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
        if None in (declared.digest, declared.size, declared.raw_digest):
            raise InvalidRequestError(
                f"upload {upload.id} was declared without its digests and sizes; "
                "`complete` must name digest, size, raw_digest and raw_size"
            )
        ref = _ref(upload, declared.digest)
        if upload.method == "stream":
            # Verified as the bytes arrived (the PUT): only what they were is compared here.
            if upload.received_token is None:
                raise ConflictError(
                    f"no bytes were received for upload {upload.id}; send them before completing"
                )
            with self.store.open_staged(ref) as staged:
                header, entries = read_header(staged.stream, upload.received_raw_size)
            token = staged.token
            received = Verified(
                upload.received_digest,
                upload.received_size,
                upload.received_raw_digest,
                upload.received_raw_size,
                header,
                entries,
            )
            check_named(received, declared)
        elif upload.method == "s3-multipart":
            return self._verify_parts(upload, repo, ref, declared, parts)
        else:
            header, token = self._verify_whole(ref, declared)
        _check_base(header, repo)
        return header, self.store.promote(ref, token)

    def _verify_whole(self, ref: UploadRef, declared: Declared) -> tuple[Header, str]:
        """Read the upload's stored object in one pass and check it against `declared`."""
        with self.store.open_staged(ref) as staged:
            if staged.size != declared.size:
                raise SizeMismatchError(
                    f"received {staged.size} bytes but the upload declared {declared.size}"
                )
            header = verify_stream(
                staged.stream,
                declared,
                max_size=declared.size,
                max_header_bytes=self.settings.max_header_bytes,
            ).header
        return header, staged.token

    def _verify_parts(
        self,
        upload: Upload,
        repo: Repository,
        ref: UploadRef,
        declared: Declared,
        reported: list[tuple[int, str]] | None,
    ) -> tuple[Header, str]:
        """A multipart upload's parts, verified by the pass that read them as they arrived (or
        by one run now), assembled into the blob."""
        expected = max(1, math.ceil(declared.size / upload.part_size))
        numbers = [number for number, _ in reported or []]
        if reported is not None and numbers != list(range(1, expected + 1)):
            raise ConflictError(
                f"upload {upload.id} has {expected} part(s) for the size `complete` names; it reports "
                f"parts {', '.join(map(str, numbers[:10]))}{'…' if len(numbers) > 10 else ''}"
            )
        live = self.part_checks.take(upload.id)
        outcome = live.finish(expected, declared.size) if live is not None else None
        if outcome is None:  # no pass ran here (another replica, a restart, none free) or it stopped
            if self.store.assembled(ref):  # assembled by a `complete` that died before its commit
                return self._verify_assembled(repo, ref, declared)
            outcome = self.part_checks.new_pass(
                ref,
                raw_size=upload.raw_size,
                part_size=upload.part_size,
                limit=declared.size,
                expected_raw_digest=declared.raw_digest,
                expected_parts=expected,
                expected_size=declared.size,
            ).run()
        header = outcome.scan.judge(declared, max_size=declared.size).header
        for (number, etag), (_, held) in zip(reported or [], outcome.parts, strict=False):
            if etag != held:
                raise ConflictError(
                    f"the blob store does not hold the parts of upload {upload.id} as reported (part "
                    f"{number}: reported ETag {etag}, the store holds {held}); upload them again"
                )
        _check_base(header, repo)
        error = outcome.assembly_error
        if error is not None and not isinstance(error, ConflictError):
            raise error
        if error is None and self.store.complete_assembly(ref, outcome.assembled):
            return header, self.store.promote(ref, "")
        # A concurrent `complete` (another replica) completed the blob's multipart upload first:
        # verify what it assembled.
        return self._verify_assembled(repo, ref, declared)

    def _verify_assembled(self, repo: Repository, ref: UploadRef, declared: Declared) -> tuple[Header, str]:
        header, token = self._verify_whole(ref, declared)
        _check_base(header, repo)
        return header, self.store.promote(ref, token)

    def receive(self, *, upload: Upload, src) -> Verified:
        """Verify the bytes of a `stream` upload as they arrive from `src` (the caller writes
        them to a staged file on the way); a verdict against them drops the upload."""
        declared = Declared(upload.digest, upload.size, upload.raw_digest, upload.raw_size)
        try:
            received = verify_stream(
                src,
                declared,
                max_size=self._max_size(upload.size, upload.raw_size),
                max_header_bytes=self.settings.max_header_bytes,
            )
            _check_base(received.header, upload.version.repository)
        except (DigestMismatchError, InvalidUploadError, BaseMismatchUploadError, UploadTooLargeError) as exc:
            self.refuse(upload=upload, error=exc)
        return received

    def refuse(self, *, upload: Upload, error: RegistryError) -> NoReturn:
        """Drop an upload whose bytes are refused, and raise `error`."""
        self._abandon(upload)
        self.metrics.pushes.labels(error.code).inc()
        raise error

    def record_received(self, *, upload: Upload, received: Verified, token: str) -> None:
        """Note what the staged file `token` (written and synced) holds, for `complete`."""
        with self.db.write() as session:
            crud.record_received(
                session,
                upload_id=upload.id,
                size=received.size,
                digest=received.digest,
                raw_size=received.raw_size,
                raw_digest=received.raw_digest,
                token=token,
            )

    def abort(self, *, upload_id: str, principal: Principal) -> None:
        self._abandon(self.get(upload_id=upload_id, principal=principal))

    def _abandon(self, upload: Upload) -> None:
        """Forget a failed upload: its staged bytes and its invisible pending version."""
        self.part_checks.stop(upload.id)
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


def _ref(upload: Upload, digest: str | None = None) -> UploadRef:
    return UploadRef(
        upload_id=upload.id,
        digest=digest or upload.digest,
        multipart_id=upload.multipart_id,
        token=upload.received_token,
    )


def _merge(upload: Upload, named: Declared | None) -> Declared:
    """What the bytes must be: what the upload declared, completed by what `complete` names; a
    value named twice must be the same both times."""
    declared = Declared(upload.digest, upload.size, upload.raw_digest, upload.raw_size)
    if named is None:
        return declared
    for field, before, now in (
        ("digest", declared.digest, named.digest),
        ("size", declared.size, named.size),
        ("raw_digest", declared.raw_digest, named.raw_digest),
        ("raw_size", declared.raw_size, named.raw_size),
    ):
        if before is not None and now is not None and before != now:
            error = SizeMismatchError if field.endswith("size") else DigestMismatchError
            raise error(f"`complete` names {field} {now}, but the upload declared {before}")
    return Declared(
        named.digest or declared.digest,
        named.size if named.size is not None else declared.size,
        named.raw_digest or declared.raw_digest,
        declared.raw_size,
    )


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
