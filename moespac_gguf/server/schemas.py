"""The request bodies of the OpenAI endpoints, validated: the fields OpenAI's and
llama-cpp-python's clients send, with the types and ranges this server can honour. Fields
this server ignores (penalties, `user`, ...) are accepted and dropped, as other local servers do;
values it cannot honour (n > 1, several prompts) are refused with the field named."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Stop = str | Annotated[list[str], Field(max_length=16)] | None


class Sampling(BaseModel):
    """What every generation request may set. Defaults are OpenAI's (temperature 1); 0 or below
    is greedy, as llama.cpp reads it."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=-1e9, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # llama-cpp-python's extension: 0 = all
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(Sampling):
    prompt: str | list[int] | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: int | None = 16  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        return v

    def token_limit(self) -> int | None:
        return self.max_tokens


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = None  # OpenAI's default: until the end of text (or a full context)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    def chat_messages(self) -> list[dict]:
        """The messages as the model's chat template takes them (a "developer" message is a system one)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Sampling.model_rebuild()
