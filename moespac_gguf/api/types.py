"""The shapes MoeSpac returns: OpenAI / llama-cpp-python completion objects, as TypedDicts.

Each response also carries a `moespac` entry with the run's decode statistics
(decode.stats.DecodeStats.as_dict) and, with a GPU tier, its slot statistics.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

from ..decode.stats import StatsDict
from ..residency.slots import SlotStats

FinishReason = Literal["stop", "length", "context", "cancelled"]


class MoespacStats(StatsDict):
    """A response's `moespac` entry."""

    slots: NotRequired[SlotStats]  # the GPU tier's expert slots, when there is one


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: None
    finish_reason: FinishReason | None


class Completion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    moespac: MoespacStats


class CompletionChunk(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]


class ChatMessage(TypedDict):
    role: str
    content: str


class ChatChoice(TypedDict):
    index: int
    message: ChatMessage
    finish_reason: FinishReason | None


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    moespac: MoespacStats


class ChatDelta(TypedDict, total=False):
    role: str
    content: str


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
