"""models.toml and `moespac models`."""

import json

import pytest

import moespac_gguf.demo.catalog as models_mod
from moespac_gguf import MoespacError
from moespac_gguf.cli import main as moespac
from moespac_gguf.demo.catalog import load_models, resolve_model

REAL = {"mixtral-8x7b-instruct", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite", "gpt-oss-20b"}


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(models_mod, "MODELS_DIR", tmp_path / "models")
    return tmp_path / "models"


def test_models_toml_names_the_demo_and_real_models():
    m = load_models()
    assert REAL <= set(m)
    assert all(m[n].section == "real" and m[n].params.get("draft") for n in REAL)
    defaults = {n for n, e in m.items() if e.default}
    assert {"smolmoe", "smollm2", "smollm2-trunc"} <= defaults
    assert m["smolmoe"].kind == "upcycled" and m["smollm2-trunc"].kind == "truncated"
    assert {m[n].config().n_expert for n, e in m.items() if e.kind == "upcycled"} == {8, 16, 32}
    # one file name per recipe
    names = [e.filename for e in m.values() if e.buildable]
    assert len(set(names)) == len(names)


def test_models_json_and_path(empty_cache, capsys):
    assert moespac(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= REAL | {"smolmoe"}
    assert all(r["path"] is None and not r["built"] for r in rows)
    assert moespac(["models", "path", "smolmoe"]) == 2
    assert "not built" in capsys.readouterr().err
    assert moespac(["models", "path", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert moespac(["models", "path", "qwen3-30b-a3b"]) == 2
    # a built file is found by name
    e = load_models()["smollm2"]
    e.path.parent.mkdir(parents=True)
    e.path.write_bytes(b"GGUF")
    assert moespac(["models", "path", "smollm2"]) == 0
    assert capsys.readouterr().out.strip() == str(e.path)
    assert resolve_model("smollm2") == e.path
    assert moespac(["models"]) == 0
    table = capsys.readouterr().out
    assert str(e.path) in table and "not built" in table and "mixtral-8x7b-instruct" in table


def test_bad_models_toml(tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text('[demo.x]\nkind = "magic"\n')
    with pytest.raises(MoespacError):
        load_models(bad)
    bad.write_text('[demo.x]\nkind = "upcycled"\nexperts = 8\ntop_k = 9\n')
    with pytest.raises(MoespacError):
        load_models(bad)
    bad.write_text("not toml [")
    with pytest.raises(MoespacError):
        load_models(bad)


def test_resolve_model_errors(empty_cache):
    with pytest.raises(MoespacError, match="no such file"):
        resolve_model("missing.gguf")
    with pytest.raises(MoespacError, match="neither a file"):
        resolve_model("not-a-model")
