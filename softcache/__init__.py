"""softcache: offline knowledge distillation from cached teacher targets."""

from softcache.errors import SoftcacheError, StoreError
from softcache.store import FORMATS, Store, open_store
from softcache.version import __version__

__all__ = ["FORMATS", "SoftcacheError", "Store", "StoreDataset", "StoreError", "__version__", "open_store"]


def __getattr__(name: str):
    # StoreDataset needs torch; import it only when asked for, so `softcache info` starts fast.
    if name == "StoreDataset":
        from softcache.data import StoreDataset

        return StoreDataset
    raise AttributeError(f"module 'softcache' has no attribute {name!r}")
