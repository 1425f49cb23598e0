"""What one generation did: token counts, drafting and acceptance, and where the time went."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict


class StatsDict(TypedDict):
    """DecodeStats.as_dict: what a completion's `moespac` entry holds."""

    n_prompt: int
    n_tokens: int
    n_steps: int
    n_drafted: int
    n_accepted: int
    tokens_per_s: float
    acceptance_rate: float | None
    mean_accepted_len: float
    t_prompt_s: float
    t_draft_s: float
    t_verify_s: float
    t_total_s: float
    finish_reason: str


@dataclass
class DecodeStats:
    """Counts and seconds of one generation (SpeculativeDecoder.generate), or of several pooled."""

    n_prompt: int = 0
    n_generated: int = 0
    n_steps: int = 0
    n_drafted: int = 0
    n_accepted: int = 0
    t_prompt: float = 0.0
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_total: float = 0.0
    finish_reason: str = ""

    @property
    def tokens_per_s(self) -> float:
        t = self.t_total - self.t_prompt
        return self.n_generated / t if t > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.n_accepted / self.n_drafted if self.n_drafted else None

    @property
    def mean_accepted_len(self) -> float:
        """Tokens committed per verification step (accepted drafts + the target's own)."""
        return self.n_generated / self.n_steps if self.n_steps else 0.0

    @classmethod
    def pooled(cls, parts: list[DecodeStats]) -> DecodeStats:
        """Several calls as one (counts and times summed: rates weighted by tokens, not averaged)."""
        return cls(
            **{
                f: sum(getattr(p, f) for p in parts)
                for f in (
                    "n_prompt",
                    "n_generated",
                    "n_steps",
                    "n_drafted",
                    "n_accepted",
                    "t_prompt",
                    "t_draft",
                    "t_verify",
                    "t_total",
                )
            }
        )

    def as_dict(self) -> StatsDict:
        return {
            "n_prompt": self.n_prompt,
            "n_tokens": self.n_generated,
            "n_steps": self.n_steps,
            "n_drafted": self.n_drafted,
            "n_accepted": self.n_accepted,
            "tokens_per_s": self.tokens_per_s,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_len": self.mean_accepted_len,
            "t_prompt_s": self.t_prompt,
            "t_draft_s": self.t_draft,
            "t_verify_s": self.t_verify,
            "t_total_s": self.t_total,
            "finish_reason": self.finish_reason,
        }

    def summary(self) -> str:
        """One line for a terminal: tokens, speed, acceptance, tokens per step, prompt time, finish."""
        acc = "n/a" if self.acceptance_rate is None else f"{self.acceptance_rate:.2f}"
        return (
            f"[{self.n_generated} tokens, {self.tokens_per_s:.1f} tok/s, acceptance {acc}, "
            f"{self.mean_accepted_len:.2f} tokens/step, prompt {self.n_prompt} tokens in {self.t_prompt:.2f} s, "
            f"finish: {self.finish_reason}]"
        )
