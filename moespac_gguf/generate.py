"""Deprecated: `moespac_gguf.generate` re-exports `MoeSpac` for one release; import it from `moespac_gguf`."""

import warnings

from .api import MoeSpac

warnings.warn(
    "moespac_gguf.generate is deprecated: use `from moespac_gguf import MoeSpac`", DeprecationWarning, stacklevel=2
)

__all__ = ["MoeSpac"]
