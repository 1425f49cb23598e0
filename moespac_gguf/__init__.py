"""moespac-gguf: speculative expert residency for GGUF Mixture-of-Experts models on llama.cpp.

    from moespac_gguf import MoeSpac
    with MoeSpac("target-moe.gguf", "self", mem_budget="8G") as m:
        print(m.create_completion("The capital of France is", max_tokens=32)["choices"][0]["text"])

`MoeSpac` and `read_layout` are imported on first use: every module of the package imports this one
first, and neither libllama (MoeSpac) nor gguf-py (read_layout) belongs in `moespac --help` or in a
process that only needs the errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .core.errors import MoespacError

if TYPE_CHECKING:
    from .api import MoeSpac
    from .core.layout import read_layout

__all__ = ["MoeSpac", "MoespacError", "read_layout", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "MoeSpac":
        from .api import MoeSpac  # lazy: loads libllama (the module docstring)

        return MoeSpac
    if name == "read_layout":
        from .core.layout import read_layout  # lazy: gguf-py takes ~0.15 s to import (the module docstring)

        return read_layout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
