"""The model catalog: the models moespac knows by name (models.toml), and building the demo ones.

    moespac models                 table: name, kind, local path or "not built"
    moespac models --json          the same as JSON
    moespac models path NAME       print one built model's path (scripts use this)
    moespac models build [NAME..]  build what is missing (default: the `default = true` demo models)

Demo files are named `<name>-<config hash>.gguf` in CACHE_DIR/models, so a
changed recipe (models.toml or the builder version) is a new file and never
a stale cache hit.
"""

from __future__ import annotations

import re
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import MoespacError
from ..core.paths import CACHE_DIR
from .smolmoe.config import BUILDER_VERSION, UpcycleConfig, short_hash, smollm2_path
from .smolmoe.router import RouterFitter
from .smolmoe.upcycle import build_upcycled, copy_dense, write_truncated

MODELS_TOML = Path(__file__).resolve().parent / "models.toml"
MODELS_DIR = CACHE_DIR / "models"
KINDS = ("upcycled", "dense", "truncated")


def _load_toml(path: Path) -> dict:
    if not path.is_file():
        raise MoespacError(f"model list not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise MoespacError(f"{path}: {e}") from None


@dataclass
class ModelEntry:
    name: str
    section: str  # "demo" (built here) or "real" (users bring the file)
    description: str = ""
    kind: str = ""  # demo: upcycled | dense | truncated
    default: bool = False
    params: dict = field(default_factory=dict)

    @property
    def buildable(self) -> bool:
        return self.section == "demo"

    def config(self):
        """The UpcycleConfig of an upcycled entry."""
        p = self.params
        return UpcycleConfig(
            n_expert=int(p.get("experts", 8)),
            top_k=int(p.get("top_k", 2)),
            dtype=str(p.get("dtype", "Q8_0")),
            noise=float(p.get("noise", 0.05)),
            seed=int(p.get("seed", 0)),
        )

    @property
    def filename(self) -> str | None:
        if not self.buildable:
            return None
        recipe = {"kind": self.kind, "builder": BUILDER_VERSION}
        if self.kind == "upcycled":
            recipe["config"] = asdict(self.config())
        elif self.kind == "truncated":
            recipe["layers"] = int(self.params["layers"])
            if self.params.get("keep_last"):
                recipe["keep_last"] = int(self.params["keep_last"])
        return f"{self.name}-{short_hash(recipe)}.gguf"

    @property
    def path(self) -> Path | None:
        return MODELS_DIR / self.filename if self.buildable else None

    @property
    def built(self) -> bool:
        return bool(self.path and self.path.is_file())

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "section": self.section,
            "kind": self.kind or None,
            "default": self.default,
            "description": self.description,
            "built": self.built,
            "path": str(self.path) if self.built else None,
            "size_bytes": self.path.stat().st_size if self.built else None,
            **self.params,
        }


def load_models(path: Path = MODELS_TOML) -> dict[str, ModelEntry]:
    data = _load_toml(path)
    unknown = set(data) - {"demo", "real"}
    if unknown:
        raise MoespacError(f"{path}: unknown section(s) {sorted(unknown)}; expected [demo.NAME] and [real.NAME]")
    out: dict[str, ModelEntry] = {}
    for section in ("demo", "real"):
        for name, table in data.get(section, {}).items():
            if not isinstance(table, dict):
                raise MoespacError(f"{path}: [{section}.{name}] must be a table")
            if name in out:
                raise MoespacError(f"{path}: model name {name!r} appears twice")
            t = dict(table)
            e = ModelEntry(
                name,
                section,
                description=str(t.pop("description", "")),
                kind=str(t.pop("kind", "")),
                default=bool(t.pop("default", False)),
                params=t,
            )
            if section == "demo":
                if e.kind not in KINDS:
                    raise MoespacError(f"{path}: [demo.{name}] kind must be one of {', '.join(KINDS)}, got {e.kind!r}")
                if e.kind == "truncated" and not isinstance(t.get("layers"), int):
                    raise MoespacError(f"{path}: [demo.{name}] needs an integer `layers`")
                if e.kind == "upcycled":
                    e.config()  # validates experts/top_k/dtype
            out[name] = e
    return out


def _get(models: dict[str, ModelEntry], name: str) -> ModelEntry:
    if name not in models:
        raise MoespacError(f"unknown model {name!r}; known: {', '.join(models)}")
    return models[name]


def model_path(name: str) -> Path:
    """The local file of a built demo model (MoespacError if unknown, a real model, or not built)."""
    e = _get(load_models(), name)
    if not e.buildable:
        raise MoespacError(f"{name} is a real model you bring yourself: pass its GGUF file with -m FILE")
    if not e.built:
        raise MoespacError(f"{name} is not built yet: run `moespac models build {name}`")
    return e.path


def resolve_model(arg: str) -> Path:
    """-m argument: an existing file, or the name of a built demo model."""
    p = Path(arg)
    if p.is_file():
        return p
    models = load_models()
    if arg in models:
        return model_path(arg)
    if p.suffix == ".gguf" or "/" in arg:
        raise MoespacError(f"no such file: {arg}")
    raise MoespacError(f"{arg!r} is neither a file nor a known model; known: {', '.join(models)}")


def build(names: list[str], force: bool = False, progress: bool = True) -> list[tuple[ModelEntry, str, float]]:
    """Build the named demo models that are missing; returns (entry, "built"|"cached", seconds)."""
    models = load_models()
    entries = [_get(models, n) for n in names]
    for e in entries:
        if not e.buildable:
            raise MoespacError(f"{e.name} is a real model: moespac does not download models; bring the GGUF file")
    todo = [e for e in entries if force or not e.built]
    results = [(e, "cached", 0.0) for e in entries if e not in todo]
    if not todo:
        return results
    src = smollm2_path()
    fitter = RouterFitter(src, CACHE_DIR / "routers", progress=progress)
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    for e in todo:
        t0 = time.perf_counter()
        if progress:
            print(f"[models] building {e.name} -> {e.path}", file=sys.stderr, flush=True)
        if e.kind == "upcycled":
            build_upcycled(
                e.path,
                e.config(),
                src,
                fitter=fitter,
                progress=progress,
                name=f"SmolMoE {e.config().n_expert}x135M ({e.name})",
            )
        elif e.kind == "dense":
            copy_dense(src, e.path)
        else:
            write_truncated(src, e.path, int(e.params["layers"]), int(e.params.get("keep_last", 0)))
        stale = re.compile(rf"^{re.escape(e.name)}-[0-9a-f]{{10}}\.gguf$")
        for old in MODELS_DIR.iterdir():
            if stale.match(old.name) and old.name != e.path.name:
                old.unlink()
        results.append((e, "built", time.perf_counter() - t0))
    return results
