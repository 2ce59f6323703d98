"""Errors only the client raises: the network, interrupted transfers, corrupt downloads, the
local cache. Errors the registry answers with arrive as its own classes (`registry.errors`:
NotFoundError, AuthenticationError, ConflictError...), rebuilt from the response's error code.
"""

from __future__ import annotations

from codec.errors import DeltaStoreError
from registry.common.errors import NotFoundError


class NetworkError(DeltaStoreError, ConnectionError):
    """The registry or the blob store could not be reached or stopped answering."""


class RegistryUnreachableError(NetworkError):
    """No connection to the registry at all (not running, wrong URL, firewall)."""


class RegistryUnavailableError(NetworkError):
    """The registry's address answered 502, 503 or 504 without the registry's error body: a proxy
    or load balancer in front of it had no registry to pass the request to. Retrying may help."""

    status: int = 503


class BlobStoreUnreachableError(NetworkError):
    """No connection to the blob store a presigned URL of the registry points at (the registry
    itself answered)."""


class OfflineError(NetworkError):
    """The client is offline (DELTACTL_OFFLINE) and what was asked for needs the registry."""


class TransferInterruptedError(NetworkError):
    """A push or pull stopped part-way; running the same command again resumes it."""


class CorruptDownloadError(DeltaStoreError, ValueError):
    """Downloaded bytes do not have the digest or size the registry recorded."""


class CacheError(DeltaStoreError, OSError):
    """The local cache holds something unusable."""


class BaseNotRegisteredError(NotFoundError):
    """The base a new repository needs is not registered and no local checkpoint was given."""

    def __init__(self, message: str, *, base_name: str):
        super().__init__(message)
        self.base_name = base_name
