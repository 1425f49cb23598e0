"""The lookahead gate: from layer l's router input, predict the experts of layers l+1..l+D.

model.py (the gate and its sidecar file), capture.py (router inputs and routing of text),
fit.py (fitting it), evaluate.py (how well it predicts), runtime.py (running it inside a decode
and feeding its predictions to the residency engine).
"""

from .model import LookaheadGate

__all__ = ["LookaheadGate"]
