"""The only layer that touches libllama (through llama-cpp-python's low-level bindings and our
`llama_moespac_*` C API): abi (loading and checking the patched library), session (a model and
its context), tap (the routing tap), capture (reading graph tensors), chat (chat templates),
slots (the expert slot cache). Importing it loads libllama."""

from .session import Session
from .slots import SlotCache

__all__ = ["Session", "SlotCache"]
