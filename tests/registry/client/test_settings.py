"""registry.client.settings: one pydantic-settings object for DELTACTL_*, refusing bad values by name."""

from __future__ import annotations

import pytest

from registry.client import RegistryApi
from registry.client.settings import ClientSettings, SettingsError, load


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("UPLOAD_CONCURRENCY", "UNAVAILABLE_MAX_WAIT", "OFFLINE", "REGISTRY", "TOKEN"):
        monkeypatch.delenv(f"DELTACTL_{name}", raising=False)
    monkeypatch.setenv("DELTACTL_HOME", str(tmp_path / "home"))


def test_defaults_and_values_from_the_environment(monkeypatch, tmp_path):
    assert (load().upload_concurrency, load().unavailable_max_wait, load().offline) == (10, 10.0, False)
    monkeypatch.setenv("DELTACTL_UPLOAD_CONCURRENCY", "4")
    monkeypatch.setenv("DELTACTL_UNAVAILABLE_MAX_WAIT", "0")
    monkeypatch.setenv("DELTACTL_OFFLINE", "1")
    monkeypatch.setenv("DELTACTL_REGISTRY", "")  # empty counts as unset
    env = load()
    assert (env.upload_concurrency, env.unavailable_max_wait, env.offline, env.registry) == (
        4,
        0.0,
        True,
        None,
    )
    assert env.cache_home == tmp_path / "home"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        (
            "DELTACTL_UPLOAD_CONCURRENCY",
            "abc",
            "DELTACTL_UPLOAD_CONCURRENCY='abc': Input should be a valid integer",
        ),
        (
            "DELTACTL_UPLOAD_CONCURRENCY",
            "0",
            "DELTACTL_UPLOAD_CONCURRENCY='0': Input should be greater than or equal to 1",
        ),
        (
            "DELTACTL_UNAVAILABLE_MAX_WAIT",
            "-5",
            "DELTACTL_UNAVAILABLE_MAX_WAIT='-5': Input should be greater than or equal to 0",
        ),
        (
            "DELTACTL_UNAVAILABLE_MAX_WAIT",
            "nan",
            "DELTACTL_UNAVAILABLE_MAX_WAIT='nan': Input should be a finite number",
        ),
        ("DELTACTL_OFFLINE", "perhaps", "DELTACTL_OFFLINE='perhaps': Input should be a valid boolean"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(monkeypatch, name, value, says):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load()
    assert str(info.value).startswith(says)
    with pytest.raises(SettingsError):  # the client refuses it too, before any request
        RegistryApi("http://127.0.0.1:9")


def test_the_settings_class_uses_the_deltactl_prefix():
    assert ClientSettings.model_config["env_prefix"] == "DELTACTL_"
