"""The main job on the built-in demo models (README command 1).

Until the real-weight demo pair exists, this writes a tiny synthetic qwen3moe
GGUF into the cache and inspects its expert layout.
"""
import sys

from moespac_gguf.cli import main as moespac
from moespac_gguf.paths import CACHE_DIR
from moespac_gguf.synthetic import SyntheticSpec, write_synthetic_moe


def main() -> int:
    path = write_synthetic_moe(CACHE_DIR / "models" / "synthetic-qwen3moe.gguf",
                               SyntheticSpec(arch="qwen3moe", n_layer=4, expert_dtype="Q8_0"))
    return moespac(["inspect", str(path), "--mem", "1M"])


if __name__ == "__main__":
    sys.exit(main())
