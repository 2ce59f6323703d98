"""The registry's Python client: `RegistryApi` (the one class `deltactl` calls), refs, the local
cache and saved credentials. Needs neither the server's packages nor torch.

    from registry.client import RegistryApi
    api = RegistryApi("http://127.0.0.1:8000")
    result = api.pull("acme/math:prod")
"""

from registry.client.api import (
    BaseInfo,
    LatestInfo,
    PullResult,
    PushResult,
    Ref,
    RegistryApi,
    RepoInfo,
    TagInfo,
    VersionInfo,
    parse_ref,
)

__all__ = [
    "BaseInfo",
    "LatestInfo",
    "PullResult",
    "PushResult",
    "Ref",
    "RegistryApi",
    "RepoInfo",
    "TagInfo",
    "VersionInfo",
    "parse_ref",
]
