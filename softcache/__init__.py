"""softcache: offline knowledge distillation from cached teacher targets."""

__version__ = "0.1.0"

from softcache.errors import SoftcacheError, StoreError  # noqa: E402
from softcache.store import FORMATS, Store, open_store  # noqa: E402

__all__ = ["FORMATS", "SoftcacheError", "Store", "StoreDataset", "StoreError", "__version__", "open_store"]


def __getattr__(name: str):
    # StoreDataset needs torch; import it only when asked for, so `softcache info` starts fast.
    if name == "StoreDataset":
        from softcache.data import StoreDataset

        return StoreDataset
    raise AttributeError(f"module 'softcache' has no attribute {name!r}")
