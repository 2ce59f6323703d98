"""CLI tests run against an isolated DELTACTL_HOME so nothing touches the user's cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "deltactl-home"
    monkeypatch.setenv("DELTACTL_HOME", str(home))
    monkeypatch.delenv("DELTACTL_REGISTRY", raising=False)
    monkeypatch.delenv("DELTACTL_TOKEN", raising=False)
    return home
