"""The registry's Python client: `RegistryApi` (the one class `deltactl` calls), refs, wire
types, the local cache and saved credentials. Needs neither the server's packages nor torch.

    from registry.client import RegistryApi
    api = RegistryApi("http://127.0.0.1:8000")
    result = api.pull("acme/math:prod")
"""

from registry.client.api import RegistryApi
from registry.client.refs import Ref, parse_ref
from registry.client.types import (
    BaseInfo,
    LatestInfo,
    Progress,
    PullResult,
    PushResult,
    RepoInfo,
    TagInfo,
    VersionInfo,
)

__all__ = [
    "BaseInfo",
    "LatestInfo",
    "Progress",
    "PullResult",
    "PushResult",
    "Ref",
    "RegistryApi",
    "RepoInfo",
    "TagInfo",
    "VersionInfo",
    "parse_ref",
]
