"""The main job on the built-in demo pair (README command 1).

SmolMoE (an 8-expert MoE upcycled from SmolLM2-135M, built by setup) generates
greedily, first alone (plain llama.cpp decoding) and then drafted by the
dense SmolLM2 with a memory budget for the residency engine; the two texts
must be identical, and the stats lines say what speculation and residency did.
"""

import sys

from moespac_gguf import MoeSpac, read_layout
from moespac_gguf.core.units import format_size
from moespac_gguf.demo.catalog import model_path

MESSAGES = [
    {
        "role": "user",
        "content": "Explain in three sentences why a mixture-of-experts model needs less compute per token.",
    }
]


def main() -> int:
    target, draft = model_path("smolmoe"), model_path("smollm2")
    layout = read_layout(target)
    budget = layout.other_bytes + layout.expert_bytes // 2 + (512 << 20)  # half the experts resident
    print(
        f"target {target.name} ({format_size(layout.file_bytes)}, {layout.n_expert} experts, "
        f"top-{layout.n_expert_used}); draft {draft.name}\n"
    )
    with MoeSpac(target, n_ctx=1024) as plain:
        a = plain.create_chat_completion(MESSAGES, max_tokens=32)["choices"][0]["message"]["content"]
        print("plain llama.cpp:", a.strip(), "\n" + plain.stats.summary() + "\n")
    with MoeSpac(target, draft, n_ctx=1024, mem_budget=budget) as m:
        b = m.create_chat_completion(MESSAGES, max_tokens=32)["choices"][0]["message"]["content"]
        print(f"moespac (draft + residency, budget {format_size(budget)}):", b.strip())
        print(m.stats.summary())
    same = a == b
    print("\nidentical greedy output:", "yes" if same else "NO")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
