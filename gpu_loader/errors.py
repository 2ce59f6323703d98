"""Errors raised by the GPU loader, rooted in the project's hierarchy (codec.errors).

Each subclasses a stdlib type too, so serving code that knows nothing of deltastore still catches it.
"""

from __future__ import annotations

from codec.errors import DeltaStoreError, IncompatibleDeltaError


class GpuLoaderError(DeltaStoreError):
    """Root of the errors the GPU loader raises on purpose."""


class BudgetError(GpuLoaderError, ValueError):
    """A memory budget that cannot be parsed, or that holds not even one delta slot."""


class SlotPoolFullError(GpuLoaderError, RuntimeError):
    """No slot can be freed: every slot is pinned or in use, or the budget has no room left."""


class DeltaDoesNotFitError(GpuLoaderError, IncompatibleDeltaError):
    """A valid delta for this base that the slot pool cannot serve (too many planes, a resized
    tensor, or a tensor of a module the loader does not patch)."""


class UnresolvedRefError(GpuLoaderError, LookupError):
    """A registry ref (`acme/math:prod`) with no resolver configured, or that the resolver refused."""


class NotLoadedError(GpuLoaderError, LookupError):
    """`pin`/`unpin`/`unload` of a delta that is not resident, or a slot index that holds none."""


class StaleSlotError(GpuLoaderError, RuntimeError):
    """A slot handle whose delta was evicted since `load()` returned it (the slot now holds another)."""


class MergedModeError(GpuLoaderError, RuntimeError):
    """Slot deltas requested while a delta is merged into the base, or a nested merge."""
