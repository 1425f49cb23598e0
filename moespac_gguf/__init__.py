"""moespac-gguf: speculative expert residency for GGUF Mixture-of-Experts models on llama.cpp.

    from moespac_gguf import MoeSpac
    with MoeSpac("target-moe.gguf", "self", mem_budget="8G") as m:
        print(m.create_completion("The capital of France is", max_tokens=32)["choices"][0]["text"])

`MoeSpac` is imported on first use: it loads libllama, which `read_layout` and the errors do not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .core.errors import MoespacError
from .core.layout import read_layout

if TYPE_CHECKING:
    from .api import MoeSpac

__all__ = ["MoeSpac", "MoespacError", "read_layout", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "MoeSpac":
        from .api import MoeSpac  # lazy: loads libllama (the module docstring)

        return MoeSpac
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
