"""Garbage collection: stale pending uploads, staging leftovers, blobs no version references,
and store objects no blob row knows. Anything younger than the grace period is left alone, so a
push in flight never loses its bytes."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

from registry.server import crud
from registry.server.blobstores import BlobStore, UploadRef
from registry.server.db import Database
from registry.server.metrics import RegistryMetrics
from registry.server.models import utcnow
from registry.server.settings import Settings


@dataclass
class GcReport:
    stale_uploads: int = 0
    staged_objects: int = 0
    blobs: int = 0
    orphan_objects: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def collect_garbage(
    *,
    db: Database,
    store: BlobStore,
    settings: Settings,
    actor: str = "gc",
    now: dt.datetime | None = None,
    dry_run: bool = False,
    metrics: RegistryMetrics | None = None,
) -> GcReport:
    now = now or utcnow()
    upload_cutoff = now - dt.timedelta(seconds=settings.upload_ttl_seconds)
    grace_cutoff = now - dt.timedelta(seconds=settings.gc_grace_seconds)
    report = GcReport(dry_run=dry_run)

    # 1. pending uploads nobody completed in time: their bytes and their invisible versions
    with db.read() as session:
        stale = crud.stale_uploads(session, older_than=upload_cutoff)
    for upload in stale:
        report.stale_uploads += 1
        if not dry_run:
            if upload.method != "exists":
                store.discard(UploadRef(upload.id, upload.digest, upload.multipart_id))
            with db.write() as session:
                crud.delete_upload(session, upload=upload)

    # 2. staging leftovers of uploads that no longer exist (a crash between steps)
    if not dry_run:
        with db.read() as session:
            live = crud.live_upload_ids(session)
        report.staged_objects = store.sweep_staging(live_upload_ids=live, older_than=grace_cutoff)

    # 3. blobs no version references
    with db.read() as session:
        candidates = [
            (b.digest, b.store_key) for b in crud.unreferenced_blobs(session, older_than=grace_cutoff)
        ]
    for digest, key in candidates:
        if dry_run:
            report.blobs += 1
            continue
        with db.write() as session:
            # Row and object go together: the row is deleted only if still unreferenced, and the
            # object is removed before that deletion commits.
            if crud.delete_blob_if_unreferenced(session, digest=digest):
                store.delete(key)
                report.blobs += 1

    # 4. store objects no blob row knows (a push whose commit failed, or lost a dedup race)
    old_keys = [obj.key for obj in store.list_blobs() if obj.modified < grace_cutoff]
    for i in range(0, len(old_keys), 500):
        batch = old_keys[i : i + 500]
        with db.read() as session:
            known = crud.known_blob_keys(session, keys=batch)
        for key in batch:
            if key not in known:
                report.orphan_objects += 1
                if not dry_run:
                    store.delete(key)

    if not dry_run:
        with db.write() as session:
            crud.record_event(session, actor=actor, action="gc", target="registry", detail=report.as_dict())
        if metrics is not None:
            for kind in ("stale_uploads", "staged_objects", "blobs", "orphan_objects"):
                metrics.gc_removed.labels(kind).inc(getattr(report, kind))
    return report
