"""`deltactl base add` and `push --base-path` accept a Hub model id like a local directory."""

from __future__ import annotations

from codec.checkpoint import Checkpoint
from tests.cli.registry_fixtures import (  # noqa: F401  (fixtures)
    deltactl,
    deltactl_json,
    deltas,
    registry,
    start_registry,
)
from tests.support.fake_hub import hub, hub_repos  # noqa: F401  (fixtures)


def test_base_add_takes_a_hub_id_and_registers_its_fingerprint(hub, registry, hub_repos):
    added = deltactl_json("base", "add", "org/base", "org/base@v2")
    assert added["fingerprint"] == Checkpoint.open(hub_repos["org/base"]["v2"]).fingerprint()
    missing = deltactl("base", "add", "org/other", "org/nope")
    assert missing.exit_code == 3
    assert "org/nope: no such model" in missing.stderr
