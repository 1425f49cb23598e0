"""The Python API: `MoeSpac`, in the shape of `llama_cpp.Llama`, its options and typed responses."""

from .moespac import MoeSpac
from .options import ModelOptions, SamplingOptions
from .text import TextStream

__all__ = ["MoeSpac", "ModelOptions", "SamplingOptions", "TextStream"]
