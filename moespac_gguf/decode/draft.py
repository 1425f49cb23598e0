"""Draft sources: where the tokens a target verifies come from.

A draft is either a separate GGUF of the same vocabulary (`FileDraft`), or the target itself
routing fewer experts per token (`SelfDraft`, `-md self`). `draft_source` turns a command-line
or API argument into one of them; the rest of the runtime asks the source what it needs
(`shares_target`, `file`, `open`) instead of comparing strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..core.errors import MoespacError
from ..core.layout import MoeLayout
from ..llama.session import Session

SELF_DRAFT = "self"  # the draft argument (-md self) that names SelfDraft
DRAFT_TOP_K = 1  # experts a self-draft routes per token


class DraftSource(Protocol):
    shares_target: bool  # the target's own file: same pages and same KV layout (its KV can be copied)
    file: str | None  # a separate file whose weights take memory beside the target's, else None

    def open(self, target: MoeLayout, **session_args) -> Session:
        """A Session of the draft for the target of `target` (Session keyword arguments passed on)."""


@dataclass(frozen=True)
class FileDraft:
    """A separate GGUF with the target's vocabulary (checked when the decoder is built)."""

    file: str
    shares_target = False

    def open(self, target: MoeLayout, **session_args) -> Session:
        return Session(self.file, **session_args)


@dataclass(frozen=True)
class SelfDraft:
    """The target's own file with `top_k` routed experts per token.

    Loaded from the same file, a self-draft shares the target's page-cache pages: it costs no
    weight memory (under a cap a separate draft's file takes memory experts could have). Under a
    memory budget the runtime restricts its routing to the experts the engine holds (patch
    0009), so it reads nothing either: unrestricted, its reads of experts not held land in the
    unlocked window and are mostly reclaimed before verification.
    """

    top_k: int = DRAFT_TOP_K
    shares_target = True
    file = None

    def open(self, target: MoeLayout, **session_args) -> Session:
        if target.n_expert_used <= self.top_k:
            raise MoespacError(
                f"-md {SELF_DRAFT} needs a target that routes more than {self.top_k} expert(s) "
                f"per token; {Path(target.path).name} routes {target.n_expert_used}"
            )
        overrides = {f"{target.arch}.expert_used_count": self.top_k}
        return Session(target.path, overrides=overrides, **session_args)


def draft_source(draft: str | Path | DraftSource) -> DraftSource:
    """A draft argument as a source: SELF_DRAFT is the target itself, anything else a GGUF file
    (MoespacError if there is no such file); a DraftSource is returned as it is."""
    if isinstance(draft, (FileDraft, SelfDraft)):
        return draft
    if str(draft) == SELF_DRAFT:
        return SelfDraft()
    if not Path(draft).is_file():
        raise MoespacError(f"no such draft file: {draft}")
    return FileDraft(str(draft))
