"""Administration: garbage collection, the consistency check and the audit log (global admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from registry.common import names
from registry.server import crud
from registry.server.deps import PageLimit, PositionCursor, PrincipalDep, ReadSessionDep, StateDep
from registry.server.fsck import check_consistency
from registry.server.gc import collect_garbage
from registry.server.schemas import AuditEventOut, FsckOut, GcOut, Page

router = APIRouter(prefix="/v1", tags=["admin"])


@router.post("/admin/gc", response_model=GcOut)
async def run_gc(state: StateDep, principal: PrincipalDep, dry_run: Annotated[bool, Query()] = False):
    """Remove stale pending uploads, staging leftovers, unreferenced blobs and orphan store objects."""
    principal.require_admin()
    report = await run_in_threadpool(
        lambda: collect_garbage(
            db=state.db,
            store=state.store,
            settings=state.settings,
            actor=principal.name,
            dry_run=dry_run,
            metrics=state.metrics,
        )
    )
    return GcOut(**report.as_dict())


@router.get("/admin/fsck", response_model=FsckOut)
async def run_fsck(state: StateDep, principal: PrincipalDep, digests: Annotated[bool, Query()] = True):
    """Check that the index and the blob store agree (every blob row has its object and, with
    `digests`, its bytes still verify) and the index's own invariants; read-only."""
    principal.require_admin()
    report = await run_in_threadpool(
        lambda: check_consistency(db=state.db, store=state.store, settings=state.settings, digests=digests)
    )
    return FsckOut(**report.as_dict())


@router.get("/audit", response_model=Page[AuditEventOut])
def audit_log(
    session: ReadSessionDep,
    principal: PrincipalDep,
    limit: PageLimit,
    cursor: PositionCursor = None,
    target: Annotated[str | None, Query(max_length=256, pattern=names.TEXT_PATTERN)] = None,
):
    """Who pushed, tagged or deleted what, newest first."""
    principal.require_admin()
    rows, next_cursor = crud.list_events(session, target=target, cursor=cursor, limit=limit)
    return Page[AuditEventOut](items=[AuditEventOut.model_validate(e) for e in rows], next_cursor=next_cursor)
