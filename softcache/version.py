"""The package version, in a module of its own: softcache.store's writer stamps it into every
manifest, and softcache/__init__.py imports softcache.store, so it cannot live in the package root."""

__version__ = "0.1.0"
