"""deltastore GPU loader: one resident base model, hot-swapped compressed delta slots beside it
(BitDelta sign planes, DeltaDQ), and multi-tenant forwards whose rows each use a different delta
(docs/gpu_loader.md).

    from gpu_loader import DeltaModel
    dm = DeltaModel.from_pretrained(
        "base/", device="cuda", dtype=torch.float16, max_slots=64, memory_budget="8GiB"
    )
    slot = dm.load("math.bdelta")
    logits = dm(input_ids, delta_ids=[slot, -1])
"""

from .errors import (
    BudgetError,
    DeltaDoesNotFitError,
    GpuLoaderError,
    MergedModeError,
    NotLoadedError,
    SlotPoolFullError,
    StaleSlotError,
    UnresolvedRefError,
)
from .model import DeltaModel
from .pool_layout import PoolLayout
from .resolver import RefResolver, is_registry_ref, resolve_ref
from .sizes import format_size, parse_size
from .slot_pool import SlotHandle, SlotPool
from .staging import StagedDelta

__all__ = [
    "DeltaModel",
    "SlotPool",
    "SlotHandle",
    "PoolLayout",
    "StagedDelta",
    "RefResolver",
    "resolve_ref",
    "is_registry_ref",
    "parse_size",
    "format_size",
    "GpuLoaderError",
    "BudgetError",
    "SlotPoolFullError",
    "DeltaDoesNotFitError",
    "UnresolvedRefError",
    "NotLoadedError",
    "StaleSlotError",
    "MergedModeError",
]
