"""moespac-gguf: speculative expert residency for GGUF MoE models on llama.cpp."""
from .errors import MoespacError

__all__ = ["MoespacError"]
__version__ = "0.1.0"
