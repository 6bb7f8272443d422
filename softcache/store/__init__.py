"""Stores of cached teacher targets: one interface, several on-disk formats."""

from softcache.store.encoding import Encoding, id_dtype_for
from softcache.store.layout import Layout
from softcache.store.reader import Store, open_store
from softcache.store.registry import FORMATS, make_format
from softcache.store.writer import StoreWriter

__all__ = ["Encoding", "FORMATS", "Layout", "Store", "StoreWriter", "id_dtype_for", "make_format", "open_store"]
