"""Routing traces: which experts each token used in each layer, and the Mixtral importer.

A RoutingTrace is the common currency of the predictors, the simulator and the
statistics: our own llama.cpp routing tap and the real Mixtral traces in
../shared/data/traces both end up in this one shape, saved as one .npz file.

Mixtral JSONL alignment rule (`moespac trace-import`): vLLM logged one row per
(problem, layer, decode token), and the layers of one problem disagree by 1-2
tokens at its end. For each problem we keep exactly the token indices that
EVERY layer logged (the intersection; in practice the shortest layer's prefix)
and drop the other rows, so every kept token has a complete routing in all
layers and no -1 padding appears. The dropped row count is reported and
stored in meta.
"""

from __future__ import annotations

import datetime
import json
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.atomic import atomic_path
from ..core.errors import MoespacError
from ..core.routing import routing_counts

FORMAT = "moespac-routing-trace-v1"
MIXTRAL_N_EXPERT = 8
ALIGNMENT = (
    "per problem, keep only the token indices every layer logged "
    "(intersection over layers); rows of other tokens are dropped"
)
PROMPT, DECODE = 0, 1  # phase of a row: prefilled with its prompt, or generated
_ARRAYS = ("experts", "weights", "tokens", "positions", "sequence", "phase")
_DTYPES = {
    "experts": np.int16,
    "weights": np.float32,
    "tokens": np.int32,
    "positions": np.int32,
    "sequence": np.int32,
    "phase": np.uint8,
}


@dataclass(eq=False)
class RoutingTrace:
    """Per-token, per-layer expert routing of one or more generations."""

    experts: np.ndarray  # int16 [n_layer, n_tokens, k]; -1 where a layer has no routing for that token
    weights: np.ndarray  # float32 [n_layer, n_tokens, k]; 0 where experts == -1
    tokens: np.ndarray  # int32 [n_tokens]; -1 when unknown (imported traces)
    positions: np.ndarray  # int32 [n_tokens]; position in its sequence
    sequence: np.ndarray  # int32 [n_tokens]; which prompt/generation each token belongs to
    phase: np.ndarray  # uint8 [n_tokens]; PROMPT (prefill) or DECODE
    n_expert: int
    meta: dict  # JSON-able: model name/arch, source, prompt file, dates...

    def __post_init__(self):
        # Coerce and check once here, so every consumer (and load) can trust the shapes.
        for name in _ARRAYS:
            setattr(self, name, np.asarray(getattr(self, name), dtype=_DTYPES[name]))
        self.n_expert = int(self.n_expert)
        if self.experts.ndim != 3 or self.weights.shape != self.experts.shape:
            raise MoespacError(
                f"trace experts/weights must share a [n_layer, n_tokens, k] shape, "
                f"got {self.experts.shape} and {self.weights.shape}"
            )
        for name in _ARRAYS[2:]:
            if getattr(self, name).shape != (self.n_tokens,):
                raise MoespacError(f"trace {name} must have shape ({self.n_tokens},), got {getattr(self, name).shape}")
        if self.experts.size and not -1 <= self.experts.min() <= self.experts.max() < self.n_expert:
            raise MoespacError(f"trace expert ids must lie in -1..{self.n_expert - 1}")

    @property
    def n_layer(self) -> int:
        return self.experts.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.experts.shape[1]

    @property
    def k(self) -> int:
        return self.experts.shape[2]

    def save(self, path) -> None:
        """Write one compressed .npz at exactly `path` (np.savez would append .npz to a name),
        atomically: a killed writer leaves no partial trace under that name."""
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                format=np.array(FORMAT),
                n_expert=np.array(self.n_expert),
                meta=np.array(json.dumps(self.meta)),
                **{name: getattr(self, name) for name in _ARRAYS},
            )

    @classmethod
    def load(cls, path) -> RoutingTrace:
        path = Path(path)
        if not path.is_file():
            raise MoespacError(f"trace file not found: {path}")
        not_a_trace = MoespacError(f"{path} is not a moespac routing trace (.npz from trace-import)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "format" not in npz.files or str(npz["format"]) != FORMAT:
                    raise not_a_trace
                return cls(
                    **{name: npz[name] for name in _ARRAYS},
                    n_expert=int(npz["n_expert"]),
                    meta=json.loads(str(npz["meta"])),
                )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            raise not_a_trace from None

    def select(self, mask) -> RoutingTrace:
        """The tokens picked by a boolean mask or index array over tokens, in that order."""
        mask = np.asarray(mask)
        return RoutingTrace(
            self.experts[:, mask],
            self.weights[:, mask],
            *(getattr(self, name)[mask] for name in _ARRAYS[2:]),
            n_expert=self.n_expert,
            meta=dict(self.meta),
        )

    def usage_counts(self) -> np.ndarray:
        """int64 [n_layer, n_expert]: how many routings each expert received in each layer."""
        return routing_counts(self.experts, self.n_expert)

    @classmethod
    def concat(cls, traces) -> RoutingTrace:
        """Tokens of all traces in order; sequence ids are shifted so they stay distinct."""
        traces = list(traces)
        if not traces:
            raise MoespacError("cannot concatenate zero traces")
        shape = {(t.n_layer, t.k, t.n_expert) for t in traces}
        if len(shape) > 1:
            raise MoespacError(f"cannot concatenate traces of different (n_layer, k, n_expert): {sorted(shape)}")
        offsets = np.cumsum([0] + [int(t.sequence.max()) + 1 if t.n_tokens else 0 for t in traces[:-1]])
        return cls(
            np.concatenate([t.experts for t in traces], axis=1),
            np.concatenate([t.weights for t in traces], axis=1),
            np.concatenate([t.tokens for t in traces]),
            np.concatenate([t.positions for t in traces]),
            np.concatenate([t.sequence + off for t, off in zip(traces, offsets)]),
            np.concatenate([t.phase for t in traces]),
            n_expert=traces[0].n_expert,
            meta={"parts": [t.meta for t in traces]},
        )


def _read_mixtral_rows(path: Path, progress: bool) -> dict:
    """{(dataset, problem_id): {layer: {token_idx: (experts, probs)}}}, streamed line by line."""
    problems: dict = defaultdict(lambda: defaultdict(dict))
    k = 0
    with (
        open(path, "rb") as f,
        tqdm(
            total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}", disable=not progress
        ) as bar,
    ):
        for lineno, line in enumerate(f, 1):
            bar.update(len(line))
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, layer, tok = (row["dataset"], row["problem_id"]), int(row["layer"]), int(row["token_idx"])
                routing = (row["experts"], row["gating_probs"])
                sizes = (len(routing[0]), len(routing[1]))
            except (ValueError, TypeError, KeyError) as e:
                raise MoespacError(f"{path}:{lineno}: not a Mixtral routing row ({type(e).__name__}: {e})") from None
            k = k or sizes[0]
            if sizes != (k, k):
                raise MoespacError(f"{path}:{lineno}: expected {k} experts and {k} gating_probs per row")
            if tok in problems[key][layer]:
                raise MoespacError(f"{path}:{lineno}: duplicate row for problem {key[1]} layer {layer} token {tok}")
            problems[key][layer][tok] = routing
    return problems


def import_mixtral_jsonl(path, progress: bool = False) -> RoutingTrace:
    """Read a Mixtral vLLM routing JSONL (decode tokens only) into a trace; see ALIGNMENT."""
    path = Path(path)
    if not path.is_file():
        raise MoespacError(f"trace file not found: {path}")
    problems = _read_mixtral_rows(path, progress)
    if not problems:
        raise MoespacError(f"{path} holds no routing rows")
    n_layer = 1 + max(layer for layers in problems.values() for layer in layers)
    experts, weights, positions, sequence, kept_ids = [], [], [], [], []
    n_rows = n_kept = 0
    for key, layers in problems.items():
        n_rows += sum(map(len, layers.values()))
        common = sorted(set.intersection(*(set(layers.get(layer, ())) for layer in range(n_layer))))
        if not common:
            continue
        rows = [[layers[layer][tok] for tok in common] for layer in range(n_layer)]
        experts.append(np.array([[e for e, _ in r] for r in rows]))
        weights.append(np.array([[p for _, p in r] for r in rows]))
        positions.append(np.array(common))
        sequence.append(np.full(len(common), len(kept_ids)))
        kept_ids.append(key)
        n_kept += n_layer * len(common)
    if not kept_ids:
        raise MoespacError(f"{path}: no problem has a token logged in all {n_layer} layers")
    n_tokens = sum(map(len, positions))
    meta = {
        "model": "Mixtral-8x7B-Instruct",
        "arch": "mixtral",
        "source": "vLLM FP8 greedy, decode tokens",
        "source_file": str(path.resolve()),
        "dataset": ",".join(sorted({d for d, _ in kept_ids})),
        "problem_ids": [pid for _, pid in kept_ids],
        "alignment": ALIGNMENT,
        "rows_read": n_rows,
        "rows_dropped": n_rows - n_kept,
        "problems_dropped": len(problems) - len(kept_ids),
        "imported": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    return RoutingTrace(
        np.concatenate(experts, axis=1),
        np.concatenate(weights, axis=1),
        np.full(n_tokens, -1),
        np.concatenate(positions),
        np.concatenate(sequence),
        np.ones(n_tokens),
        n_expert=MIXTRAL_N_EXPERT,
        meta=meta,
    )


def open_trace(path) -> RoutingTrace:
    """A saved trace (.npz), or a Mixtral routing .jsonl imported on the fly."""
    path = str(path)
    return import_mixtral_jsonl(path) if path.endswith(".jsonl") else RoutingTrace.load(path)
