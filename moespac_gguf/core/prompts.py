"""Prompt sets: rows of a Spec-Bench style JSONL file, and the ways the tools pick from them.

The benchmark, the trace recorder, the gate's evaluation and the bench scripts all read the same
files (`../shared/data/prompts`); reading and picking live here once so that a trace recorded
with `--select spread` replays exactly the prompts a benchmark run used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import MoespacError
from .paths import SHARED_DIR

SPEC_BENCH = SHARED_DIR / "data" / "prompts" / "spec_bench_question.jsonl"
SELECTIONS = ("first", "spread", "round-robin")


def load_prompts(path: str | Path, limit: int | None = None, select: str = "first") -> list[dict]:
    """Rows of a Spec-Bench style JSONL ({"turns": [...], "category": ..., "question_id": ...}, or
    {"prompt": ...}) as {"text", "category", "question_id", "line"}, the text being the first turn.

    select "first" takes the first `limit` rows; "spread" takes `limit` rows evenly spaced over
    the file (every category of Spec-Bench is then covered); "round-robin" takes the first row of
    every category, then the second of every category, ... (categories in sorted order).
    """
    if select not in SELECTIONS:
        raise MoespacError(f"unknown prompt selection {select!r} (choose from {', '.join(SELECTIONS)})")
    path = Path(path)
    if not path.is_file():
        raise MoespacError(f"prompt file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["turns"][0] if "turns" in row else row["prompt"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise MoespacError(f'{path}:{lineno}: expected a JSON object with "turns" (or "prompt")') from None
            if not isinstance(text, str) or not text.strip():
                raise MoespacError(f"{path}:{lineno}: empty prompt")
            rows.append(
                {
                    "text": text,
                    "category": row.get("category", ""),
                    "question_id": row.get("question_id", lineno),
                    "line": lineno,
                }
            )
    if not rows:
        raise MoespacError(f"{path} holds no prompts")
    if select == "round-robin":
        rows = _round_robin(rows)
    if limit is None or limit >= len(rows):
        return rows
    if limit < 1:
        raise MoespacError(f"--limit must be >= 1, got {limit}")
    if select == "spread":
        idx = np.unique(np.linspace(0, len(rows) - 1, limit).round().astype(int))
        return [rows[i] for i in idx]
    return rows[:limit]


def _round_robin(rows: list[dict]) -> list[dict]:
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    out, i = [], 0
    while len(out) < len(rows):
        for category in sorted(by_category):
            if i < len(by_category[category]):
                out.append(by_category[category][i])
        i += 1
    return out
