"""The index operations of registry.server.crud on a real, migrated SQLite database: version
numbering, `latest` and tags, deletion, position-cursor paging, bases and repositories, blob references."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update

from registry.common.errors import ConflictError, InvalidRequestError, NotFoundError
from registry.server import crud
from registry.server.db import Database
from registry.server.models import PENDING, READY, AuditEvent, Blob, Repository, Tag, Upload, Version, utcnow

FINGERPRINT = "sha256:" + "0f" * 32
OTHER_FINGERPRINT = "sha256:" + "ab" * 32
ACTOR = "alice"


def digest_of(label: str) -> str:
    return "sha256:" + hashlib.sha256(label.encode()).hexdigest()


@pytest.fixture
def db(migrated_url) -> Iterator[Database]:
    database = Database.from_url(migrated_url)
    yield database
    database.dispose()


def add_base(session, name: str = "llama", fingerprint: str = FINGERPRINT):
    base, _ = crud.create_base(
        session,
        name=name,
        fingerprint=fingerprint,
        architecture="LlamaForCausalLM",
        parameter_count=1000,
        config=None,
        actor=ACTOR,
    )
    return base


def add_repo(session, full_name: str = "acme/math", base_name: str = "llama", visibility: str = "public"):
    namespace, name = full_name.split("/")
    return crud.create_repo(
        session,
        namespace=namespace,
        name=name,
        base_name=base_name,
        description="",
        visibility=visibility,
        actor=ACTOR,
    )


def start_upload(session, repo: Repository, digest: str, upload_id: str | None = None) -> Upload:
    return crud.create_upload(
        session,
        upload_id=upload_id or hashlib.sha256(f"{repo.id}{digest}{utcnow()}".encode()).hexdigest()[:32],
        repo=repo,
        digest=digest,
        size=10,
        raw_digest=digest_of("raw:" + digest),
        raw_size=20,
        method="stream",
        multipart_id=None,
        part_size=None,
        description="",
        fidelity=None,
        actor=ACTOR,
        expires_at=utcnow() + dt.timedelta(hours=1),
    )


def publish(session, upload: Upload, store_key: str | None = "default") -> Version:
    return crud.publish_version(
        session,
        upload=upload,
        store_key=f"blobs/{upload.digest}" if store_key == "default" else store_key,
        codec="bitdelta",
        dtype="float16",
        bits=1,
        size_ratio=0.1,
        fidelity=None,
        header_metadata={},
        actor=ACTOR,
    )


def push(session, repo: Repository, label: str, *, new_blob: bool = True) -> Version:
    """A ready version of `repo` whose bytes have the digest of `label` (recorded unless `new_blob`
    is False, the deduplicated case)."""
    return publish(session, start_upload(session, repo, digest_of(label)), "default" if new_blob else None)


def tag_names(session, repo: Repository) -> dict[str, int]:
    return {tag.name: tag.version.number for tag in crud.list_tags(session, repo=repo)}


def all_pages(fetch, limit: int) -> tuple[list, int]:
    """Every row a paged listing gives, following its cursor; and how many pages it took."""
    rows, cursor, pages = [], None, 0
    while True:
        page, cursor = fetch(cursor=cursor, limit=limit)
        rows += page
        pages += 1
        assert len(page) <= limit
        if cursor is None:
            return rows, pages
        assert len(page) == limit, "a page before the last is full"


# --- versions and latest ---------------------------------------------------------------------
def test_versions_are_numbered_per_repository_and_numbers_are_never_reused(db):
    with db.write() as session:
        add_base(session)
        math, code = add_repo(session, "acme/math"), add_repo(session, "acme/code")
        assert [push(session, math, f"m{i}").number for i in range(3)] == [1, 2, 3]
        assert [push(session, code, f"c{i}").number for i in range(2)] == [1, 2]
        crud.delete_version(session, repo=math, number=3, actor=ACTOR)
        # the counter is not "max + 1": a deleted number stays retired, so a ref never changes meaning
        assert push(session, math, "m3").number == 4
        assert [v.number for v in crud.list_versions(session, repo=math, cursor=None, limit=10)[0]] == [
            4,
            2,
            1,
        ]


def test_a_pending_version_is_invisible_and_has_no_number(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        upload = start_upload(session, repo, digest_of("a"), upload_id="u" * 32)
        assert (upload.version.state, upload.version.number) == (PENDING, None)
        assert crud.list_versions(session, repo=repo, cursor=None, limit=10) == ([], None)
        assert crud.published_version(session, upload_id="u" * 32) is None
        with pytest.raises(NotFoundError, match=r"^acme/math has no tag 'latest' \(nothing pushed yet\)$"):
            crud.get_version(session, repo=repo, ref="latest")
        version = publish(session, upload)
        assert (version.state, version.number, version.blob_digest) == (READY, 1, digest_of("a"))
        assert crud.published_version(session, upload_id="u" * 32).id == version.id
        # publishing consumes the upload row
        with pytest.raises(NotFoundError, match=f"^upload {'u' * 32} does not exist"):
            crud.get_upload(session, upload_id="u" * 32)


def test_latest_follows_each_push_and_refs_resolve_by_number_or_tag(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        for label in "abc":
            pushed = push(session, repo, label)
            assert crud.get_version(session, repo=repo, ref="latest").id == pushed.id
        assert tag_names(session, repo) == {"latest": 3}
        assert crud.get_version(session, repo=repo, ref=2).blob_digest == digest_of("b")
        crud.set_tag(session, repo=repo, name="stable", number=1, actor=ACTOR)
        assert crud.get_version(session, repo=repo, ref="stable").number == 1
        # set_tag moves an existing tag instead of refusing or duplicating it
        moved = crud.set_tag(session, repo=repo, name="stable", number=2, actor=ACTOR)
        assert (moved.name, moved.version.number) == ("stable", 2)
        assert tag_names(session, repo) == {"latest": 3, "stable": 2}
        with pytest.raises(NotFoundError, match=r"^acme/math has no version 7$"):
            crud.get_version(session, repo=repo, ref=7)
        with pytest.raises(NotFoundError, match=r"^acme/math has no version 7$"):
            crud.set_tag(session, repo=repo, name="stable", number=7, actor=ACTOR)
        with pytest.raises(NotFoundError, match=r"^acme/math has no tag 'prod'$"):
            crud.get_version(session, repo=repo, ref="prod")
        crud.delete_tag(session, repo=repo, name="stable", actor=ACTOR)
        with pytest.raises(NotFoundError, match=r"^acme/math has no tag 'stable'$"):
            crud.delete_tag(session, repo=repo, name="stable", actor=ACTOR)


def test_latest_versions_maps_each_repository_to_its_newest(db):
    with db.write() as session:
        add_base(session)
        math, code, empty = (
            add_repo(session, "acme/math"),
            add_repo(session, "acme/code"),
            add_repo(session, "a/e"),
        )
        push(session, math, "m1"), push(session, math, "m2"), push(session, code, "c1")
        latest = crud.latest_versions(session, repo_ids=[math.id, code.id, empty.id])
        assert {repo_id: v.number for repo_id, v in latest.items()} == {math.id: 2, code.id: 1}
        assert crud.latest_versions(session, repo_ids=[]) == {}


def test_tags_by_version_lists_each_versions_tags_by_name(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        v1, v2, v3 = (push(session, repo, label) for label in "abc")
        crud.set_tag(session, repo=repo, name="zeta", number=1, actor=ACTOR)
        crud.set_tag(session, repo=repo, name="alpha", number=1, actor=ACTOR)
        crud.set_tag(session, repo=repo, name="stable", number=3, actor=ACTOR)
        assert crud.tags_by_version(session, version_ids=[v1.id, v2.id, v3.id]) == {
            v1.id: ["alpha", "zeta"],
            v3.id: ["latest", "stable"],
        }
        assert crud.tags_by_version(session, version_ids=[v2.id]) == {}
        assert crud.tags_by_version(session, version_ids=[]) == {}


# --- deleting versions -----------------------------------------------------------------------
def test_deleting_the_latest_version_removes_its_tags_and_moves_latest_back(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        for label in "abc":
            push(session, repo, label)
        crud.set_tag(session, repo=repo, name="stable", number=3, actor=ACTOR)
        crud.set_tag(session, repo=repo, name="canary", number=3, actor=ACTOR)
        crud.set_tag(session, repo=repo, name="old", number=1, actor=ACTOR)
        # `latest` is not reported removed: it moves
        assert crud.delete_version(session, repo=repo, number=3, actor=ACTOR) == (["canary", "stable"], 2)
        assert tag_names(session, repo) == {"latest": 2, "old": 1}
        session.flush()  # audit events are added to the session; autoflush is off
        event = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())).first()
        assert (event.action, event.target, event.detail) == (
            "delete_version",
            "acme/math",
            {"version": 3, "removed_tags": ["canary", "stable"]},
        )


def test_deleting_an_older_version_leaves_latest_where_it_is(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        for label in "abc":
            push(session, repo, label)
        assert crud.delete_version(session, repo=repo, number=1, actor=ACTOR) == ([], 3)
        assert tag_names(session, repo) == {"latest": 3}
        with pytest.raises(NotFoundError, match=r"^acme/math has no version 1$"):
            crud.delete_version(session, repo=repo, number=1, actor=ACTOR)


def test_deleting_the_last_version_removes_latest(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        push(session, repo, "a")
        crud.set_tag(session, repo=repo, name="stable", number=1, actor=ACTOR)
        assert crud.delete_version(session, repo=repo, number=1, actor=ACTOR) == (["stable"], None)
        assert crud.list_tags(session, repo=repo) == []
        with pytest.raises(NotFoundError, match=r"nothing pushed yet"):
            crud.get_version(session, repo=repo, ref="latest")
        # the next push starts `latest` again, with the next number
        assert push(session, repo, "b").number == 2
        assert tag_names(session, repo) == {"latest": 2}


# --- paging ----------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [0, 1, 4, 5])
def test_versions_page_newest_first_each_exactly_once(db, count):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        for i in range(count):
            push(session, repo, f"v{i}")
    with db.read() as session:
        rows, pages = all_pages(lambda **kw: crud.list_versions(session, repo=repo, **kw), limit=2)
    assert [v.number for v in rows] == list(range(count, 0, -1))
    # a listing whose length is a multiple of the limit ends without an empty extra page
    assert pages == max(1, -(-count // 2))


def test_a_version_cursor_is_a_position_so_deletions_between_pages_skip_and_repeat_nothing(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        for i in range(6):
            push(session, repo, f"v{i}")
        first, cursor = crud.list_versions(session, repo=repo, cursor=None, limit=2)
        assert ([v.number for v in first], cursor) == ([6, 5], "5")
        crud.delete_version(session, repo=repo, number=6, actor=ACTOR)  # already seen
        crud.delete_version(session, repo=repo, number=3, actor=ACTOR)  # not yet seen
        second, cursor = crud.list_versions(session, repo=repo, cursor=cursor, limit=2)
        assert ([v.number for v in second], cursor) == ([4, 2], "2")
        assert [v.number for v in crud.list_versions(session, repo=repo, cursor=cursor, limit=2)[0]] == [1]


def test_versions_filtered_by_digest_share_the_blob(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        push(session, repo, "a"), push(session, repo, "b"), push(session, repo, "a", new_blob=False)
        rows, cursor = crud.list_versions(session, repo=repo, cursor=None, limit=10, digest=digest_of("a"))
        assert ([v.number for v in rows], cursor) == ([3, 1], None)


def test_repositories_bases_and_events_page_in_id_order_each_exactly_once(db):
    with db.write() as session:
        for i in range(5):
            add_base(session, f"base{i}")
        for i in range(7):
            add_repo(session, f"ns{i % 2}/repo{i}", base_name=f"base{i % 5}")
    with db.read() as session:
        bases, _ = all_pages(lambda **kw: crud.list_bases(session, **kw), limit=2)
        repos, _ = all_pages(lambda **kw: crud.list_repos(session, **kw), limit=3)
        in_ns1, _ = all_pages(lambda **kw: crud.list_repos(session, namespace="ns1", **kw), limit=2)
        events, _ = all_pages(lambda **kw: crud.list_events(session, **kw), limit=4)
    assert [b.name for b in bases] == [f"base{i}" for i in range(5)]
    assert [r.name for r in repos] == [f"repo{i}" for i in range(7)]
    assert [r.name for r in in_ns1] == ["repo1", "repo3", "repo5"]
    # audit events go newest first
    assert [e.target for e in events] == [f"ns{i % 2}/repo{i}" for i in reversed(range(7))] + [
        f"base{i}" for i in reversed(range(5))
    ]


def test_repository_search_filters_and_escapes_like_wildcards(db):
    with db.write() as session:
        add_base(session), add_base(session, "mistral", OTHER_FINGERPRINT)
        add_repo(session, "acme/math_v1"), add_repo(session, "acme/mathXv1"), add_repo(session, "beta/code")
        add_repo(session, "priv/secret", base_name="mistral", visibility="private")

        def names(**filters) -> list[str]:
            return [r.full_name for r in crud.list_repos(session, cursor=None, limit=10, **filters)[0]]

        # `_` is a literal underscore, not LIKE's any-character
        assert names(query="math_") == ["acme/math_v1"]
        assert names(query="acme") == ["acme/math_v1", "acme/mathXv1"]
        assert names(base_name="mistral") == ["priv/secret"]
        assert names(visible_namespaces=[]) == ["acme/math_v1", "acme/mathXv1", "beta/code"]
        assert names(visible_namespaces=["priv"])[-1] == "priv/secret"
        with pytest.raises(NotFoundError, match=r"^base model 'nope' is not registered$"):
            names(base_name="nope")


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", "١٢"])
def test_a_cursor_that_is_not_decimal_digits_is_refused(db, cursor):
    with db.read() as session, pytest.raises(InvalidRequestError) as excinfo:
        crud.list_bases(session, cursor=cursor, limit=5)
    assert str(excinfo.value) == f"invalid cursor {cursor!r} (a cursor is decimal digits)"


def test_a_cursor_beyond_32_bit_positions_is_clamped_not_overflowed(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        push(session, repo, "a")
        huge = "9" * 40
        # ascending listings: past the last id, an empty last page; descending: the whole listing
        assert crud.list_bases(session, cursor=huge, limit=5) == ([], None)
        assert crud.list_repos(session, cursor=huge, limit=5) == ([], None)
        assert [v.number for v in crud.list_versions(session, repo=repo, cursor=huge, limit=5)[0]] == [1]
        session.flush()  # audit events are added to the session; autoflush is off
        assert len(crud.list_events(session, cursor=huge, limit=50)[0]) == 3


def test_opaque_cursors_round_trip_and_garbage_is_refused():
    value = ["acme/math", 17]
    assert crud.decode_cursor(crud.encode_cursor(value)) == value
    assert "=" not in crud.encode_cursor(value)
    assert crud.decode_cursor(None) is None and crud.decode_cursor("") is None
    with pytest.raises(InvalidRequestError, match=r"^invalid cursor '!!!!'$"):
        crud.decode_cursor("!!!!")


# --- bases and repositories ------------------------------------------------------------------
def test_registering_a_base_again_is_a_no_op_and_a_new_fingerprint_conflicts(db):
    with db.write() as session:
        first = add_base(session)
        again, created = crud.create_base(
            session,
            name="llama",
            fingerprint=FINGERPRINT,
            architecture=None,
            parameter_count=None,
            config=None,
            actor="bob",
        )
        assert (again.id, created, again.created_by, again.architecture) == (
            first.id,
            False,
            ACTOR,
            "LlamaForCausalLM",
        )
        with pytest.raises(ConflictError) as excinfo:
            add_base(session, fingerprint=OTHER_FINGERPRINT)
        assert str(excinfo.value) == (
            f"base model 'llama' is already registered with fingerprint {FINGERPRINT}, "
            f"not {OTHER_FINGERPRINT}"
        )
        assert crud.get_base(session, name="llama").fingerprint == FINGERPRINT
        session.flush()  # audit events are added to the session; autoflush is off
        assert [e.action for e in crud.list_events(session, cursor=None, limit=10)[0]] == ["create_base"]


def test_a_base_is_deleted_only_when_no_repository_uses_it(db):
    with db.write() as session:
        add_base(session)
        math, code = add_repo(session, "acme/math"), add_repo(session, "acme/code")
        with pytest.raises(ConflictError) as excinfo:
            crud.delete_base(session, name="llama", actor=ACTOR)
        assert str(excinfo.value) == (
            "base model 'llama' is used by 2 repositories; delete them first "
            "(GET /v1/bases/llama/repos lists them)"
        )
        crud.delete_repo(session, repo=code, actor=ACTOR)
        with pytest.raises(ConflictError, match=r"is used by 1 repository; delete it first \("):
            crud.delete_base(session, name="llama", actor=ACTOR)
        crud.delete_repo(session, repo=math, actor=ACTOR)
        crud.delete_base(session, name="llama", actor=ACTOR)
        with pytest.raises(NotFoundError, match=r"^base model 'llama' is not registered$"):
            crud.get_base(session, name="llama")
        with pytest.raises(NotFoundError, match=r"^base model 'llama' is not registered$"):
            crud.delete_base(session, name="llama", actor=ACTOR)
        # the name is free again, for any fingerprint
        assert crud.create_base(
            session,
            name="llama",
            fingerprint=OTHER_FINGERPRINT,
            architecture=None,
            parameter_count=None,
            config=None,
            actor=ACTOR,
        )[1]


def test_a_taken_repository_name_conflicts_and_loses_nothing(db):
    with db.write() as session:
        add_base(session)
        first = add_repo(session, "acme/math")
    with pytest.raises(ConflictError, match=r"^repository acme/math already exists$"), db.write() as session:
        add_repo(session, "acme/math")
    with db.write() as session:
        # the name is per namespace
        assert add_repo(session, "other/math").full_name == "other/math"
    with (
        pytest.raises(NotFoundError, match=r"^base model 'mistral' is not registered$"),
        db.write() as session,
    ):
        add_repo(session, "acme/code", base_name="mistral")
    with db.read() as session:
        assert crud.get_repo(session, namespace="acme", name="math").id == first.id
        listed = crud.list_repos(session, cursor=None, limit=10)[0]
        assert [r.full_name for r in listed] == ["acme/math", "other/math"]
        assert [e.action for e in crud.list_events(session, cursor=None, limit=10)[0]] == [
            "create_repo",
            "create_repo",
            "create_base",
        ]
        with pytest.raises(NotFoundError, match=r"^repository acme/code does not exist$"):
            crud.get_repo(session, namespace="acme", name="code")


def test_a_name_conflict_rolls_back_only_its_own_insert(db):
    """The conflict is caught in a savepoint: the same transaction goes on and commits its other work."""
    with db.write() as session:
        add_base(session)
        add_repo(session, "acme/math")
    with db.write() as session:
        with pytest.raises(ConflictError, match=r"^repository acme/math already exists$"):
            add_repo(session, "acme/math")
        assert add_repo(session, "acme/code").full_name == "acme/code"
    with db.read() as session:
        listed = crud.list_repos(session, cursor=None, limit=10)[0]
        assert [r.full_name for r in listed] == ["acme/math", "acme/code"]


def test_deleting_a_repository_takes_its_versions_and_tags_but_not_its_blobs(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        push(session, repo, "a"), push(session, repo, "b")
        crud.delete_repo(session, repo=repo, actor=ACTOR)
    with db.read() as session:
        assert (crud.count_rows(session, Version), crud.count_rows(session, Tag)) == (0, 0)
        assert crud.count_rows(session, Blob) == 2  # left for GC, which removes bytes and row together
        later = utcnow() + dt.timedelta(minutes=1)
        assert {b.digest for b in crud.unreferenced_blobs(session, older_than=later)} == {
            digest_of("a"),
            digest_of("b"),
        }


# --- blobs and uploads -----------------------------------------------------------------------
def test_a_blob_is_recorded_once_and_shared_by_deduplicated_versions(db):
    with db.write() as session:
        add_base(session)
        math, code = add_repo(session, "acme/math"), add_repo(session, "acme/code")
        push(session, math, "a")
        # a concurrent push of the same bytes recorded under another key: the first record wins
        publish(session, start_upload(session, code, digest_of("a")), store_key="blobs/elsewhere")
        push(session, code, "a", new_blob=False)
        assert crud.count_rows(session, Blob) == 1
        assert crud.get_blob(session, digest=digest_of("a")).store_key == f"blobs/{digest_of('a')}"
        assert crud.get_blob(session, digest=digest_of("missing")) is None
        assert crud.known_blob_keys(session, keys=[f"blobs/{digest_of('a')}", "blobs/elsewhere"]) == {
            f"blobs/{digest_of('a')}"
        }
        assert crud.known_blob_keys(session, keys=[]) == set()


def test_a_blob_is_unreferenced_only_without_versions_or_uploads_and_old_enough(db):
    later = utcnow() + dt.timedelta(minutes=1)
    with db.write() as session:
        add_base(session)
        math, code = add_repo(session, "acme/math"), add_repo(session, "acme/code")
        push(session, math, "a")
        push(session, code, "a", new_blob=False)
        push(session, math, "b")
        crud.delete_version(session, repo=math, number=2, actor=ACTOR)
        # "b" has no version left; "a" is still a version of code
        assert [b.digest for b in crud.unreferenced_blobs(session, older_than=later)] == [digest_of("b")]
        # a blob younger than the cutoff is kept (a push may be about to reference it)
        assert crud.unreferenced_blobs(session, older_than=utcnow() - dt.timedelta(hours=1)) == []
        # an upload in flight that declares the same bytes references it too
        start_upload(session, code, digest_of("b"), upload_id="p" * 32)
        assert crud.unreferenced_blobs(session, older_than=later) == []
        assert crud.delete_blob_if_unreferenced(session, digest=digest_of("b")) is False
        crud.delete_upload(session, upload=crud.get_upload(session, upload_id="p" * 32))
        assert crud.delete_blob_if_unreferenced(session, digest=digest_of("a")) is False
        assert crud.delete_blob_if_unreferenced(session, digest=digest_of("b")) is True
        assert crud.delete_blob_if_unreferenced(session, digest=digest_of("b")) is False  # already gone
        assert crud.get_blob(session, digest=digest_of("b")) is None
        assert crud.get_blob(session, digest=digest_of("a")) is not None


def test_stale_uploads_are_those_created_before_the_cutoff_and_deleting_one_drops_its_version(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        start_upload(session, repo, digest_of("old"), upload_id="o" * 32)
        start_upload(session, repo, digest_of("new"), upload_id="n" * 32)
        session.execute(
            update(Upload).where(Upload.id == "o" * 32).values(created_at=utcnow() - dt.timedelta(days=2))
        )
        crud.record_received(
            session,
            upload_id="n" * 32,
            size=7,
            digest=digest_of("partial"),
            raw_size=9,
            raw_digest=digest_of("raw"),
            token="t" * 32,
        )
    with db.write() as session:
        cutoff = utcnow() - dt.timedelta(days=1)
        assert [u.id for u in crud.stale_uploads(session, older_than=cutoff)] == ["o" * 32]
        assert crud.live_upload_ids(session) == {"o" * 32, "n" * 32}
        fresh = crud.get_upload(session, upload_id="n" * 32)
        assert (fresh.received_size, fresh.received_digest) == (7, digest_of("partial"))
        assert (fresh.received_raw_size, fresh.received_raw_digest, fresh.received_token) == (
            9,
            digest_of("raw"),
            "t" * 32,
        )
        for upload in crud.stale_uploads(session, older_than=cutoff):
            crud.delete_upload(session, upload=upload)
    with db.read() as session:
        assert crud.live_upload_ids(session) == {"n" * 32}
        assert crud.count_rows(session, Version) == 1  # the fresh upload's pending version only
        with pytest.raises(NotFoundError) as excinfo:
            crud.get_upload(session, upload_id="o" * 32)
        assert str(excinfo.value) == f"upload {'o' * 32} does not exist (completed, aborted or expired)"


def test_delete_upload_never_removes_a_published_version(db):
    with db.write() as session:
        add_base(session)
        repo = add_repo(session)
        upload = start_upload(session, repo, digest_of("a"), upload_id="q" * 32)
        version_id = upload.version_id
        publish(session, upload)
        # a late abort of an upload that was completed meanwhile must not take the version with it
        crud.delete_upload(session, upload=upload)
        assert session.get(Version, version_id).state == READY
        assert crud.get_version(session, repo=repo, ref="latest").id == version_id
