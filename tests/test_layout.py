"""GGUF MoE layout: offsets against the file's bytes and against llama.cpp; bad inputs."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf_edit import gguf_copy

from moespac_gguf import MoespacError
from moespac_gguf.core.gguf import read_header
from moespac_gguf.core.layout import read_layout
from moespac_gguf.demo.synthetic import SUPPORTED_ARCHS, SyntheticSpec, write_synthetic_moe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("layout")
    return {
        arch: write_synthetic_moe(d / f"{arch}.gguf", SyntheticSpec(arch=arch, expert_dtype="Q8_0"))
        for arch in SUPPORTED_ARCHS
    }


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_expert_offsets_match_file_bytes(models, arch):
    """Every expert's byte range, read raw from the file, equals that expert's slice of the tensor."""
    path = models[arch]
    layout = read_layout(path)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    raw = np.fromfile(path, dtype=np.uint8)
    assert layout.arch == arch and layout.layers
    for layer in layout.layers:
        assert layer.router is not None
        for name, span in layer.tensors.items():
            t = tensors[name]
            per_expert = np.asarray(t.data).reshape(layout.n_expert, -1).view(np.uint8)
            for e in (0, layout.n_expert // 2, layout.n_expert - 1):
                lo = span.offset + e * span.expert_stride
                assert raw[lo : lo + span.expert_stride].tobytes() == per_expert[e].tobytes()
    assert layout.expert_bytes + layout.other_bytes <= layout.file_bytes
    assert layout.expert_bytes == sum(l.bytes_per_expert for l in layout.layers) * layout.n_expert


def test_offsets_match_what_llama_cpp_reads(models):
    """Bytes at our offset for an expert equal the bytes llama.cpp holds for that tensor (via its mmap)."""
    from moespac_gguf.llama.session import Session

    path = models["qwen3moe"]
    layout = read_layout(path)
    name, span = next(iter(layout.layers[0].tensors.items()))
    with Session(path, n_ctx=64, tap=False):
        # the mapping llama.cpp made of the file: find it in /proc/self/maps
        maps = [l.split() for l in open("/proc/self/maps") if l.rstrip().endswith(str(path))]
        assert maps, "llama.cpp did not mmap the model"
        lo, hi = (int(x, 16) for x in maps[0][0].split("-"))
        file_off = int(maps[0][2], 16)
        import ctypes

        e = layout.n_expert - 1
        addr = lo + span.offset + e * span.expert_stride - file_off
        assert addr + span.expert_stride <= hi
        mem = ctypes.string_at(addr, span.expert_stride)
    with open(path, "rb") as f:
        f.seek(span.offset + e * span.expert_stride)
        assert f.read(span.expert_stride) == mem


def test_inspect_json_cli(models):
    path = models["qwen3moe"]
    out = subprocess.run(
        [sys.executable, "-m", "moespac_gguf.cli", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    d = json.loads(out)
    layout = read_layout(path)
    assert {"arch", "n_layer", "n_expert", "n_expert_used", "expert_bytes", "other_bytes", "layers"} <= d.keys()
    assert d["n_expert"] == layout.n_expert and d["expert_bytes"] == layout.expert_bytes
    t = d["layers"][0]["tensors"]["blk.0.ffn_down_exps.weight"]
    assert t["offset"] == layout.layers[0].tensors["blk.0.ffn_down_exps.weight"].offset
    assert t["expert_stride"] > 0 and t["type"] == "Q8_0"


def test_inspect_table_and_mem(models):
    out = subprocess.run(
        [sys.executable, "-m", "moespac_gguf.cli", "inspect", str(models["llama"]), "--mem", "1G"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "expert weights" in out and "experts fit" in out


def _error_of(*args):
    r = subprocess.run([sys.executable, "-m", "moespac_gguf.cli", *args], capture_output=True, text=True)
    return r.returncode, r.stderr.strip()


def test_bad_inputs_give_one_line_errors(tmp_path, models):
    dense = write_synthetic_moe(tmp_path / "dense.gguf", SyntheticSpec(arch="llama", n_expert=0))
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello, not a model\n")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    good = models["olmoe"].read_bytes()
    truncated_header = tmp_path / "trunc_header.gguf"
    truncated_header.write_bytes(good[:200])
    truncated_data = tmp_path / "trunc_data.gguf"
    truncated_data.write_bytes(good[: len(good) - 1000])
    cases = {
        tmp_path / "missing.gguf": "no such file",
        tmp_path: "not a file",
        not_gguf: "not a GGUF file",
        empty: "not a GGUF file",
        dense: "dense model",
        truncated_header: "corrupt or truncated",
        truncated_data: "truncated",
    }
    for path, expected in cases.items():
        code, err = _error_of("inspect", str(path))
        assert code == 2, (path, err)
        assert expected in err and len(err.splitlines()) == 1, (path, err)
        with pytest.raises(MoespacError, match=expected):
            read_layout(path)


def test_unknown_arch(tmp_path):
    """An MoE file of an arch we do not know is refused by name."""
    src = write_synthetic_moe(tmp_path / "m.gguf", SyntheticSpec(arch="qwen3moe"))
    gguf_copy(src, tmp_path / "odd.gguf", arch="frobnicator")
    with pytest.raises(MoespacError, match="unsupported architecture 'frobnicator'"):
        read_layout(tmp_path / "odd.gguf")


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_header_reader_agrees_with_gguf_py(models, arch):
    """core.gguf parses the header itself (gguf.GGUFReader is slow on big vocabularies): every scalar
    and string it keeps, and every tensor's type, shape, offset and size, equal gguf-py's."""
    path = models[arch]
    header = read_header(path)
    reader = gguf.GGUFReader(path)
    scalars = {
        key: field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.") and field.types[0] != gguf.GGUFValueType.ARRAY
    }
    assert header.metadata == scalars
    got = [(t.name, t.type, t.shape, t.offset, t.nbytes) for t in header.tensors]
    want = [
        (t.name, t.tensor_type, tuple(int(x) for x in t.shape), int(t.data_offset), int(t.n_bytes))
        for t in reader.tensors
    ]
    assert got == want
