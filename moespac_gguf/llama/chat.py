"""Chat templates: messages -> the token ids a model expects, with the template its GGUF carries.

GGUF files store their Hugging Face chat template (Jinja2) in `tokenizer.chat_template`; it is
rendered here in a sandbox, as transformers renders it, with the model's own BOS/EOS texts.
"""

from __future__ import annotations

from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..core.errors import MoespacError


def render_chat(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """Render a GGUF chat template (Jinja2, as in Hugging Face tokenizers), ending with the
    assistant's generation prompt."""

    def raise_exception(msg):
        raise MoespacError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)


def chat_tokens(session, messages: list[dict]) -> list[int] | None:
    """Token ids of `messages` rendered by the model's chat template (None: it has none)."""
    template = session.chat_template()
    if not template:
        return None
    bos = session.token_bytes(session.bos, special=True).decode("utf-8", errors="replace")
    eos_id = int(session.metadata("tokenizer.ggml.eos_token_id") or -1)
    eos = session.token_bytes(eos_id, special=True).decode("utf-8", errors="replace") if eos_id >= 0 else ""
    text = render_chat(template, messages, bos, eos)
    return session.tokenize(text, add_special=not (bos and text.startswith(bos)))


def format_prompt(session, text: str) -> list[int]:
    """Token ids of `text` as one user turn of the model's chat template (raw text without one)."""
    tokens = chat_tokens(session, [{"role": "user", "content": text}])
    return session.tokenize(text) if tokens is None else tokens
