"""mpmri-serve: the top layer (the ``mpmri`` command and the demo)."""

from contract import __version__

__all__ = ["__version__"]
