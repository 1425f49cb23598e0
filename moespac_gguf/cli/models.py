"""`moespac models`: the models moespac knows by name (demo.catalog), and building the demo ones."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..demo.catalog import ModelEntry, build, load_models, model_path


def _size(e: ModelEntry) -> str:
    if not e.built:
        return ""
    n = e.path.stat().st_size
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _table(models: dict[str, ModelEntry]) -> str:
    rows = [("name", "kind", "size", "path")]
    for e in models.values():
        if e.buildable:
            where = str(e.path) if e.built else "not built"
            rows.append((e.name + (" *" if e.default else ""), e.kind, _size(e), where))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.append("(* built by setup; `moespac models build NAME` builds the others)")
    real = [e for e in models.values() if not e.buildable]
    if real:
        lines += ["", "real models (bring the GGUF file, pass it with -m; nothing is downloaded):"]
        w = max(len(e.name) for e in real)
        for e in real:
            lines.append(f"  {e.name.ljust(w)}  {e.description}")
            if e.params.get("draft"):
                lines.append(f"  {'':{w}}  draft: {e.params['draft']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moespac models",
        description="Known models: demo models built from SmolLM2 and real MoE models users bring (models.toml).",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    sub = p.add_subparsers(dest="action")
    sp = sub.add_parser("path", help="print the local path of a built model")
    sp.add_argument("name")
    sb = sub.add_parser("build", help="build demo models that are missing (default: the default ones)")
    sb.add_argument("names", nargs="*")
    sb.add_argument("--all", action="store_true", help="every demo model (several GB)")
    sb.add_argument("--force", action="store_true", help="rebuild even when the file exists")
    a = p.parse_args(argv)
    if a.action == "path":
        print(model_path(a.name))
        return 0
    models = load_models()
    if a.action == "build":
        names = a.names or [n for n, e in models.items() if e.buildable and (a.all or e.default)]
        t0 = time.perf_counter()
        for e, status, secs in build(names, force=a.force):
            print(f"{e.name}: {status} {e.path} ({_size(e)}{f', {secs:.0f} s' if status == 'built' else ''})")
        print(f"[models] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return 0
    if a.json:
        print(json.dumps([e.as_dict() for e in models.values()], indent=2))
    else:
        print(_table(models))
    return 0
