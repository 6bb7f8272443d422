"""softcache: offline knowledge distillation from cached teacher targets."""

__version__ = "0.1.0"

from softcache.errors import SoftcacheError, StoreError  # noqa: E402
from softcache.store import FORMATS, Store, open_store  # noqa: E402

__all__ = ["FORMATS", "SoftcacheError", "Store", "StoreError", "__version__", "open_store"]
