"""GGUF fuzzing (issue 23): seeded mutations of the header, metadata and tensor-info bytes of a
tiny MoE, a sweep of its metadata (every key renamed, every value read as each other type of its
width) and truncations at every section boundary, each through `moespac inspect` and `moespac
run`. Every case must end in a normal run or in exactly one line of error on stderr (exit code 2),
never in a traceback, a crash (a signal) or a hang; an `inspect` that succeeds must describe the
file as it is (top-k within the experts, every expert's bytes inside the file), not garbage.

Starting Python costs about a second, so one child process runs the cases in-process through
`moespac_gguf.cli.main` (its stdout and stderr captured at the file-descriptor level, so output
written by llama.cpp itself counts too) and reports each case as a JSON line. The parent names
a case that kills the child (and runs it once more alone to confirm) or stops it answering
(killed after CASE_TIMEOUT), then goes on with the next case in a fresh child.

Wider searches: MOESPAC_FUZZ_MUTATIONS=2000, MOESPAC_FUZZ_SEED=N, MOESPAC_FUZZ_ARCH=deepseek2 (any
synthetic architecture); MOESPAC_FUZZ_REPORT=out.json writes every case's outcome.

The focused tests after it check each validation of core.gguf / core.layout on one edited file.

`python tests/test_gguf_fuzz.py --child SPEC START COUNT` is the child (the test starts it).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from gguf_edit import gguf_copy

SEED = int(os.environ.get("MOESPAC_FUZZ_SEED", 23))
N_MUTATIONS = int(os.environ.get("MOESPAC_FUZZ_MUTATIONS", 300))
CASE_TIMEOUT = 20.0  # seconds a case (inspect and run) may take before it counts as a hang
COMMANDS = {
    "inspect": lambda path: ["inspect", path],
    "run": lambda path: ["run", "-m", path, "-p", "hi", "-n", "4"],
}

# -- the file's fields -----------------------------------------------------------------------

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Field:
    """One field of a GGUF file: its byte range and what it holds."""

    section: str  # header, metadata, tensor_info
    label: str  # e.g. "kv 'qwen3moe.expert_count' value"
    kind: str  # "int" (an unsigned little-endian integer), "float", "bytes" (string bytes), "magic"
    start: int
    end: int

    def value(self, data: bytes) -> int:
        return int.from_bytes(data[self.start : self.end], "little")


@dataclass
class Layout:
    """Every field of a well-formed GGUF file, and its section boundaries (name -> offset)."""

    fields: list[Field]
    boundaries: dict[str, int]

    def find(self, label: str) -> Field:
        (f,) = [f for f in self.fields if f.label == label]
        return f


def gguf_fields(data: bytes) -> Layout:
    """The fields of a (well-formed) GGUF file, read here rather than by the code under test."""
    pos = 0
    fields: list[Field] = []
    bounds: dict[str, int] = {}

    def take(section: str, label: str, kind: str, size: int) -> Field:
        nonlocal pos
        f = Field(section, label, kind, pos, pos + size)
        fields.append(f)
        pos += size
        return f

    def string(section: str, label: str) -> str:
        n = take(section, f"{label} length", "int", 8).value(data)
        return data[take(section, label, "bytes", n).start : pos].decode()

    def value(section: str, label: str, vtype: int) -> None:
        if vtype == _STRING:
            string(section, label)
        else:
            take(section, label, "float" if _SCALAR[vtype] in "fd" else "int", struct.calcsize(_SCALAR[vtype]))

    take("header", "magic", "magic", 4)
    take("header", "version", "int", 4)
    n_tensors = take("header", "tensor_count", "int", 8).value(data)
    n_kv = take("header", "kv_count", "int", 8).value(data)
    for i in range(n_kv):
        bounds[f"kv {i}"] = pos
        key = string("metadata", f"kv {i} key")
        fields[-2:] = [replace(f, label=f.label.replace(f"kv {i}", f"kv {key!r}")) for f in fields[-2:]]
        vtype = take("metadata", f"kv {key!r} type", "int", 4).value(data)
        if vtype == _ARRAY:
            etype = take("metadata", f"kv {key!r} array type", "int", 4).value(data)
            count = take("metadata", f"kv {key!r} array count", "int", 8).value(data)
            for j in range(count):
                value("metadata", f"kv {key!r} [{j}]", etype)
        else:
            value("metadata", f"kv {key!r} value", vtype)
    bounds["tensor_info"] = pos
    for i in range(n_tensors):
        bounds[f"tensor_info {i}"] = pos
        name = string("tensor_info", f"tensor {i} name")
        fields[-2:] = [replace(f, label=f.label.replace(f"tensor {i}", f"tensor {name}")) for f in fields[-2:]]
        n_dims = take("tensor_info", f"tensor {name} n_dims", "int", 4).value(data)
        for d in range(n_dims):
            take("tensor_info", f"tensor {name} ne[{d}]", "int", 8)
        take("tensor_info", f"tensor {name} type", "int", 4)
        take("tensor_info", f"tensor {name} offset", "int", 8)
    bounds["padding"] = pos
    data_start = -(-pos // 32) * 32
    bounds["data"] = data_start
    offsets = [f for f in fields if f.label.endswith(" offset") and f.section == "tensor_info"]
    for i, f in enumerate(offsets):
        bounds[f"tensor_data {i}"] = data_start + f.value(data)
    bounds["end"] = len(data)
    return Layout(fields, bounds)


def patched(data: bytes, f: Field, value: int | bytes) -> bytes:
    """`data` with field `f` set to `value` (an int in the field's width, or raw bytes)."""
    raw = (
        value
        if isinstance(value, bytes)
        else (value % (1 << (8 * (f.end - f.start)))).to_bytes(f.end - f.start, "little")
    )
    return data[: f.start] + raw + data[f.start + len(raw) :]


# -- the cases ---------------------------------------------------------------------------------


def _interesting(orig: int, width: int, rng: random.Random) -> int:
    top = 1 << (8 * width)
    choices = [
        0,
        1,
        2,
        3,
        orig + 1,
        orig - 1,
        orig * 2,
        orig // 2,
        orig + 1000,
        top - 1,  # -1
        top >> 1,  # the sign bit
        (top >> 1) - 1,
        1 << 31,
        (1 << 32) - 1,
        7,
        8,
        9,
        13,
        64,
        513,
        1025,
        rng.randrange(top),
        rng.randrange(1 << min(8 * width, 16)),
    ]
    return rng.choice(choices) % top


_TYPES_BY_WIDTH = ((0, 1, 7), (2, 3), (4, 5, 6), (10, 11, 12))  # GGUF value types of 1, 2, 4 and 8 bytes
_SAME_WIDTH = {t: group for group in _TYPES_BY_WIDTH for t in group}


def _mutation(data: bytes, layout: Layout, rng: random.Random) -> tuple[str, list]:
    """One seeded edit of the header, metadata or tensor-info bytes: (description, [op])."""
    section = rng.choices(["header", "metadata", "tensor_info"], weights=[1, 4, 4])[0]
    fields = [f for f in layout.fields if f.section == section and f.end > f.start]
    if section == "metadata" and rng.random() < 0.5:  # the hyperparameters llama.cpp and the reader use
        arch = layout.find("kv 'general.architecture' value")
        prefixes = (f"kv '{data[arch.start : arch.end].decode()}.", "kv 'general.")
        fields = [f for f in fields if f.label.startswith(prefixes)]
    f = rng.choice(fields)
    r = rng.random()
    if r < 0.06:  # bytes inserted or deleted: every later field shifts
        at = rng.randrange(f.start, f.end + 1)
        if rng.random() < 0.5:
            n = rng.randint(1, 8)
            return f"delete {n} bytes at {f.label}", [("delete", at, n)]
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        return f"insert {raw.hex()} at {f.label}", [("set", at, raw.hex(), True)]
    if r < 0.20:  # a random bit
        at = rng.randrange(f.start, f.end)
        bit = rng.randrange(8)
        return f"flip bit {bit} of byte {at - f.start} of {f.label}", [
            ("set", at, bytes([data[at] ^ (1 << bit)]).hex())
        ]
    if f.label.endswith("' type") and f.value(data) in _SAME_WIDTH and rng.random() < 0.5:
        # a value of another type of the same width: the file stays well-formed, the reader gets a
        # float, a bool or a signed value where it expects an unsigned integer (or the reverse)
        new = rng.choice([t for t in _SAME_WIDTH[f.value(data)] if t != f.value(data)])
        return f"{f.label} = {new} (same width)", [("set", f.start, patched(data, f, new)[f.start : f.end].hex())]
    if f.kind == "bytes" and f.label.endswith("' key") and rng.random() < 0.5:
        # a key renamed by one character: the key the reader or llama.cpp looks for is missing
        at = rng.randrange(f.start, f.end)
        return f"byte {at - f.start} of {f.label} = 'Z' (renamed)", [("set", at, b"Z".hex())]
    if f.kind == "int":
        new = _interesting(f.value(data), f.end - f.start, rng)
        return f"{f.label} = {new}", [("set", f.start, patched(data, f, new)[f.start : f.end].hex())]
    if f.kind == "float":
        new = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30, 1e-30])
        fmt = "<f" if f.end - f.start == 4 else "<d"
        return f"{f.label} = {new}", [("set", f.start, struct.pack(fmt, new).hex())]
    at = rng.randrange(f.start, f.end)  # string bytes or the magic
    new = rng.choice([0, 0xFF, 0x80, ord("."), ord("_"), ord("x"), rng.randrange(256)])
    return f"byte {at - f.start} of {f.label} = {new:#04x}", [("set", at, bytes([new]).hex())]


def _metadata_sweep(data: bytes, layout: Layout) -> list[dict]:
    """Every scalar key renamed (missing), and its value read as each other type of its width:
    the well-formed files whose metadata is not what a reader expects (the issue's traceback)."""
    cases = []
    for f in layout.fields:
        if f.section != "metadata" or not f.label.endswith("' key"):
            continue
        key = f.label[len("kv ") : -len(" key")]
        at = f.end - 1
        cases.append(
            {
                "kind": "sweep",
                "what": f"{f.label} renamed",
                "ops": [("set", at, b"Z".hex() if data[at] != ord("Z") else b"Y".hex())],
            }
        )
        t = layout.find(f"kv {key} type")
        for new in _SAME_WIDTH.get(t.value(data), ()):
            if new != t.value(data):
                cases.append(
                    {
                        "kind": "sweep",
                        "what": f"kv {key} read as type {new}",
                        "ops": [("set", t.start, patched(data, t, new)[t.start : t.end].hex())],
                    }
                )
    return cases


def fuzz_cases(data: bytes, rng: random.Random, n_mutations: int) -> list[dict]:
    """Truncations at every section boundary and a few inside sections, a sweep of the metadata's
    keys and value types, then `n_mutations` seeded mutations."""
    layout = gguf_fields(data)
    cases = []
    cuts = {0: "empty file"}
    for f in layout.fields:
        if f.section == "header":
            cuts.setdefault(f.start, f"truncated before {f.label}")
    for name, at in layout.boundaries.items():
        cuts.setdefault(at, f"truncated at {name}")
    cuts.pop(len(data))
    cuts[len(data) - 1] = "truncated by one byte"
    sections = [("header", 0, 24), ("metadata", 24, layout.boundaries["tensor_info"])]
    sections += [("tensor_info", layout.boundaries["tensor_info"], layout.boundaries["padding"])]
    sections += [("data", layout.boundaries["data"], len(data))]
    for name, lo, hi in sections:
        for _ in range(3):
            at = rng.randrange(lo + 1, hi)
            cuts.setdefault(at, f"truncated inside {name} at {at}")
    for at, what in sorted(cuts.items()):
        cases.append({"kind": "truncation", "what": what, "ops": [("truncate", at)]})
    cases += _metadata_sweep(data, layout)
    for _ in range(n_mutations):
        what, ops = _mutation(data, layout, rng)
        while rng.random() < 0.2:  # several fields at once (in place: no field moves)
            more, more_ops = _mutation(data, layout, rng)
            if all(op[0] == "set" and len(op) == 3 for op in ops + more_ops):
                what, ops = f"{what}; {more}", ops + more_ops
        cases.append({"kind": "mutation", "what": what, "ops": ops})
    return cases


def apply_ops(data: bytes, ops: list) -> bytes:
    for op in ops:
        if op[0] == "truncate":
            data = data[: op[1]]
        elif op[0] == "delete":
            data = data[: op[1]] + data[op[1] + op[2] :]
        else:  # ("set", at, hex[, insert])
            raw = bytes.fromhex(op[2])
            insert = len(op) > 3 and op[3]
            data = data[: op[1]] + raw + data[op[1] + (0 if insert else len(raw)) :]
    return data


# -- the child: every case in-process ------------------------------------------------------------


def _layout_problems(path: str) -> list[str]:
    """What a layout that `inspect` printed must satisfy to be the file's truth, not garbage."""
    from moespac_gguf.core.layout import read_layout

    lay = read_layout(path)
    out = []
    if not 1 <= lay.n_expert_used <= lay.n_expert:
        out.append(f"top-{lay.n_expert_used} of {lay.n_expert} experts")
    for layer in lay.layers:
        if not 0 <= layer.index < lay.n_layer:
            out.append(f"MoE layer {layer.index} of {lay.n_layer}")
        for t in layer.tensors.values():
            if t.expert_stride <= 0 or t.expert_stride * lay.n_expert != t.nbytes:
                out.append(f"{t.name}: {lay.n_expert} experts of {t.expert_stride} bytes in {t.nbytes}")
            if t.offset < 0 or t.offset + t.nbytes > lay.file_bytes:
                out.append(f"{t.name} [{t.offset}, +{t.nbytes}) outside the file of {lay.file_bytes}")
    return out


def _run_cli(argv: list[str], out_path: Path, err_path: Path) -> dict:
    """One command through moespac_gguf.cli.main, fds 1 and 2 redirected to files."""
    from moespac_gguf import cli

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    tb = None
    rc: int | None = None
    t0 = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            tb = traceback.format_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return {
        "rc": rc,
        "traceback": tb,
        "stdout": out_path.read_text(errors="replace"),
        "stderr": err_path.read_text(errors="replace"),
        "s": time.perf_counter() - t0,
    }


def classify(command: str, r: dict) -> tuple[str, str]:
    """(outcome, detail): ok, error (one line), or a failure: traceback, bad-error, bad-ok."""
    if r["traceback"] is not None:
        return "traceback", r["traceback"].strip().splitlines()[-1]
    err = r["stderr"].strip().splitlines()
    if r["rc"] == 2:
        if len(err) == 1 and err[0].startswith(f"moespac {command}: error: "):
            return "error", err[0]
        return "bad-error", f"exit 2 with stderr {r['stderr'][-600:]!r}"
    if r["rc"] == 0:
        if any(not line.startswith("moespac") for line in err):
            return "bad-ok", f"exit 0 with stderr {r['stderr'][-600:]!r}"
        lines = r["stdout"].strip().splitlines()
        if command == "run" and not (lines and re.match(r"^\[\d+ tokens, ", lines[-1])):
            return "bad-ok", f"no run summary in {r['stdout'][-300:]!r}"
        if command == "inspect" and not (lines and " experts, top-" in lines[0]):
            return "bad-ok", f"no layout in {r['stdout'][-300:]!r}"
        return "ok", lines[0][:120] if lines else ""
    return "bad-exit", f"exit {r['rc']} with stderr {r['stderr'][-600:]!r}"


def child(spec_path: str, start: int, count: int) -> None:
    """Run cases start..start+count-1 of the spec, one JSON line per case on the original stdout."""
    spec = json.loads(Path(spec_path).read_text())
    source = Path(spec["source"]).read_bytes()
    work = Path(spec["work"])
    chan = os.fdopen(os.dup(1), "w", buffering=1)
    for i in range(start, min(start + count, len(spec["cases"]))):
        chan.write(json.dumps({"begin": i}) + "\n")
        chan.flush()
        path = work / f"case-{i}.gguf"
        path.write_bytes(apply_ops(source, spec["cases"][i]["ops"]))
        result: dict = {"i": i}
        for command, argv in COMMANDS.items():
            r = _run_cli(argv(str(path)), work / f"case-{i}.{command}.out", work / f"case-{i}.{command}.err")
            outcome, detail = classify(command, r)
            if outcome == "ok" and command == "inspect":
                try:
                    problems = _layout_problems(str(path))
                except Exception as e:  # noqa: BLE001 - the report names it
                    problems = [f"read_layout raised {e!r} after inspect succeeded"]
                if problems:
                    outcome, detail = "garbage", "; ".join(problems)[:600]
            result[command] = {"outcome": outcome, "detail": detail, "s": round(r["s"], 3)}
        path.unlink()
        chan.write(json.dumps(result) + "\n")
        chan.flush()


# -- the parent ------------------------------------------------------------------------------------


def _reader(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


def _spawn(spec_path: Path, start: int, count: int, err: Path) -> subprocess.Popen:
    """A child running cases start..start+count-1, in its own process group (so that a hang is
    ended with whatever it forked), its stray stderr to `err`."""
    with open(err, "ab") as e:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path), str(start), str(count)],
            stdout=subprocess.PIPE,
            stderr=e,
            text=True,
            # ggml's abort would otherwise try to attach gdb for a backtrace, for seconds or for good
            env={**os.environ, "GGML_NO_BACKTRACE": "1"},
            start_new_session=True,
        )


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_cases(spec_path: Path, n_cases: int, work: Path) -> dict[int, dict]:
    """Every case's result; a crash or a hang is recorded against the case that caused it."""
    results: dict[int, dict] = {}
    start = 0
    child_err = work / "child.err"
    while start < n_cases:
        proc = _spawn(spec_path, start, n_cases - start, child_err)
        q: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
        current, failure = None, None
        while True:
            try:
                line = q.get(timeout=CASE_TIMEOUT)
            except queue.Empty:
                _kill(proc)
                failure = "hang", f"no answer in {CASE_TIMEOUT:.0f} s"
                break
            if line is None:
                break
            msg = json.loads(line)
            if "begin" in msg:
                current = msg["begin"]
            else:
                results[msg["i"]] = msg
                current = None
        rc = proc.wait()
        if current is None:  # between cases: the harness itself failed
            if failure is not None or rc != 0 or len(results) < n_cases:
                raise AssertionError(
                    f"fuzz child: {failure or f'exit {rc}'} outside a case: {child_err.read_text()[-2000:]}"
                )
            break
        if failure is None:
            # the child died inside case `current`: run it once more alone, keep what it printed
            again = _spawn(spec_path, current, 1, child_err)
            try:
                again.communicate(timeout=CASE_TIMEOUT + 10)
                alone = f"exit {again.returncode}"
            except subprocess.TimeoutExpired:
                _kill(again)
                alone = "a hang"
            errs = "".join(p.read_text(errors="replace")[:400] for p in sorted(work.glob(f"case-{current}.*.err")))
            failure = "crash", f"exit {rc} (alone: {alone}); stderr {errs!r}"
        results[current] = {"i": current, "crash": {"outcome": failure[0], "detail": failure[1]}}
        start = current + 1
    return results


def test_fuzz_inspect_and_run(tmp_path, tiny_moe):
    """≥ 200 seeded mutations of header, metadata and tensor-info bytes, and truncations at every
    section boundary: inspect and run each end in a normal run or a one-line error."""
    t0 = time.perf_counter()
    source = tiny_moe(arch=os.environ.get("MOESPAC_FUZZ_ARCH", "qwen3moe"))
    data = source.read_bytes()
    cases = fuzz_cases(data, random.Random(SEED), N_MUTATIONS)
    work = tmp_path / "cases"
    work.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"source": str(source), "work": str(work), "cases": cases}))
    results = run_cases(spec, len(cases), work)

    if os.environ.get("MOESPAC_FUZZ_REPORT"):  # every case's outcome, for a person to read
        report = [{**case, **results[i]} for i, case in enumerate(cases)]
        Path(os.environ["MOESPAC_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1))
    counts: collections.Counter = collections.Counter()
    failures = []
    for i, case in enumerate(cases):
        for command, r in results[i].items():
            if command == "i":
                continue
            counts[command, r["outcome"]] += 1
            if r["outcome"] not in ("ok", "error"):
                failures.append(f"case {i} ({case['what']}): {command}: {r['outcome']}: {r['detail']}")
    kinds = collections.Counter(c["kind"] for c in cases)
    by_command = {
        command: ", ".join(f"{o} {n}" for (c, o), n in sorted(counts.items()) if c == command)
        for command in (*COMMANDS, "crash")
    }
    print(
        f"\nGGUF fuzz: {len(cases)} cases ({kinds['mutation']} seeded mutations, seed {SEED}; "
        f"{kinds['sweep']} key/type sweeps; {kinds['truncation']} truncations), {time.perf_counter() - t0:.1f} s"
    )
    for command, line in by_command.items():
        if line:
            print(f"  {command}: {line}")
    assert kinds["mutation"] >= 200 and kinds["truncation"] >= len(gguf_fields(data).boundaries)
    assert not failures, f"{len(failures)} bad outcomes:\n" + "\n".join(failures[:40])


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--child":
    child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))


# -- focused tests: one per validation of core.gguf / core.layout -----------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny MoE's bytes and fields, and a writer of edited copies."""
    from moespac_gguf.demo.synthetic import SyntheticSpec, write_synthetic_moe

    d = tmp_path_factory.mktemp("edits")
    src = write_synthetic_moe(d / "src.gguf", SyntheticSpec())
    data = src.read_bytes()
    counter = iter(range(1 << 30))

    def write(raw: bytes) -> Path:
        path = d / f"edit-{next(counter)}.gguf"
        path.write_bytes(raw)
        return path

    return data, gguf_fields(data), write, src


def _refused(path: Path, *needles: str) -> str:
    """read_layout's one-line MoespacError for `path`, which must name the file and the needles."""
    from moespac_gguf import MoespacError
    from moespac_gguf.core.layout import read_layout

    with pytest.raises(MoespacError) as e:
        read_layout(path)
    msg = str(e.value)
    assert str(path) in msg and len(msg.splitlines()) == 1, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def _hand_made(kvs: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    """A GGUF v3 header from raw key/value and tensor-info bytes (what no writer would produce)."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors


def _kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + payload


# core.gguf: the container


def test_string_past_the_end_of_the_file(model):
    data, lay, write, _ = model
    f = lay.find("kv 'tokenizer.ggml.tokens' [5] length")
    _refused(write(patched(data, f, 1 << 40)), "corrupt or truncated", "string 5 of 'tokenizer.ggml.tokens'")
    f = lay.find("kv 'tokenizer.ggml.tokens' array count")
    _refused(write(patched(data, f, 1 << 62)), "'tokenizer.ggml.tokens' claims")


def test_scalar_array_past_the_end_of_the_file(model):
    data, lay, write, _ = model
    f = lay.find("kv 'tokenizer.ggml.token_type' array count")
    _refused(write(patched(data, f, 1 << 61)), "corrupt or truncated", "'tokenizer.ggml.token_type'")


def test_duplicate_token_text(model):
    """llama.cpp GGML_ASSERTs (aborts) on two tokens with one text; an empty one reads as [EMPTY_<id>]."""
    data, lay, write, _ = model
    a, b = lay.find("kv 'tokenizer.ggml.tokens' [40]"), lay.find("kv 'tokenizer.ggml.tokens' [41]")
    assert b.end - b.start == a.end - a.start == 1
    _refused(write(patched(data, b, data[a.start : a.end])), "'tokenizer.ggml.tokens' has the token", "ids 40 and 41")


def test_duplicate_key_and_tensor_name(model):
    data, lay, write, _ = model
    f = lay.find("kv 'tokenizer.ggml.bos_token_id' key")
    _refused(write(patched(data, f, b"tokenizer.ggml.eos_token_id")), "'tokenizer.ggml.eos_token_id' appears twice")
    f = lay.find("tensor blk.0.attn_k.weight name")
    _refused(write(patched(data, f, b"blk.0.attn_q.weight")), "tensor 'blk.0.attn_q.weight' appears twice")


def test_names_not_utf8(model):
    data, lay, write, _ = model
    f = lay.find("kv 'qwen3moe.expert_count' key")
    _refused(write(patched(data, f, b"\xff")), "metadata key 13 is not UTF-8")
    f = lay.find("tensor blk.0.attn_k.weight name")
    _refused(write(patched(data, f, b"\xfe")), "tensor name 3 is not UTF-8")


def test_empty_key_and_nested_array(tmp_path):
    empty = tmp_path / "empty-key.gguf"
    empty.write_bytes(_hand_made(_kv(b"", 4, struct.pack("<I", 1)), n_kv=1))
    _refused(empty, "metadata key 0 is empty")
    nested = tmp_path / "nested.gguf"
    nested.write_bytes(_hand_made(_kv(b"a", 9, struct.pack("<IQ", 9, 1)), n_kv=1))
    _refused(nested, "'a' is an array of value type 9")


def test_alignment(tmp_path):
    """general.alignment must be a uint32 power of two (gguf.cpp refuses anything else)."""
    for payload, vtype, needle in [
        (struct.pack("<i", 32), 5, "has value type 5, expected 4"),
        (struct.pack("<I", 0), 4, "0 is not a power of 2"),
        (struct.pack("<I", 48), 4, "48 is not a power of 2"),
    ]:
        path = tmp_path / f"align-{vtype}-{len(needle)}.gguf"
        path.write_bytes(_hand_made(_kv(b"general.alignment", vtype, payload), n_kv=1))
        _refused(path, "general.alignment", needle)


def test_tensor_name_too_long(tmp_path):
    name = b"blk.0." + b"x" * 60
    path = tmp_path / "long.gguf"
    path.write_bytes(
        _hand_made(tensors=struct.pack("<Q", len(name)) + name + struct.pack("<IQIQ", 1, 1, 0, 0), n_tensors=1)
    )
    _refused(path, "longer than 63 bytes")


def test_tensor_shape_and_type(model):
    data, lay, write, _ = model
    _refused(write(patched(data, lay.find("tensor blk.0.attn_q.weight ne[1]"), 1 << 63)), "impossible shape")
    _refused(write(patched(data, lay.find("tensor blk.0.attn_q.weight ne[0]"), 1 << 62)), "impossible shape")
    _refused(
        write(patched(data, lay.find("tensor blk.0.attn_q.weight ne[0]"), 1 << 40)), "'blk.0.attn_q.weight' ends past"
    )
    _refused(write(patched(data, lay.find("tensor blk.0.attn_q.weight n_dims"), 5)), "has 5 dimensions")
    q8 = patched(data, lay.find("tensor blk.0.attn_q_norm.weight type"), 8)  # Q8_0 rows of 16 values
    _refused(write(q8), "'blk.0.attn_q_norm.weight' of type Q8_0 has rows of 16 values, not a multiple of 32")
    _refused(write(patched(data, lay.find("tensor blk.0.attn_q.weight type"), 4)), "unknown type 4")


def test_types_llama_cpp_cannot_compute_with(model):
    """Q8_1 and the integer types fit the file as a last tensor's type and crashed llama.cpp
    (a segfault in the output matmul, an abort in a norm's multiply): found by fuzzing."""
    data, lay, write, _ = model
    for qtype, name in ((9, "Q8_1"), (24, "I8"), (26, "I32")):
        path = write(patched(data, lay.find("tensor output.weight type"), qtype))
        _refused(path, f"tensor 'output.weight' has type {name}, which llama.cpp cannot compute with")


def test_token_texts_end_at_a_nul(model):
    """llama.cpp reads a token's text as a C string: "a\0b" and "a" are one text (an abort)."""
    data, lay, write, _ = model
    a = lay.find("kv 'tokenizer.ggml.tokens' [40]")
    t = next(f for f in lay.fields if f.label.startswith("kv 'tokenizer.ggml.tokens' [") and f.end - f.start == 2)
    j = int(t.label.split("[")[1].split("]")[0])
    _refused(write(patched(data, t, data[a.start : a.end] + b"\0")), f"ids {min(40, j)} and {max(40, j)}")


def test_tensor_data_offsets(model):
    """Each tensor's data follows the one before (aligned), as gguf.cpp requires, and ends in the file."""
    data, lay, write, _ = model
    f = lay.find("tensor blk.0.attn_k.weight offset")
    _refused(write(patched(data, f, f.value(data) + 32)), "'blk.0.attn_k.weight' has data offset")
    f = lay.find("tensor output.weight offset")
    f_dims = lay.find("tensor output.weight ne[1]")
    _refused(write(patched(data, f_dims, 1 << 20)), "truncated GGUF", "'output.weight' ends past the end")


# core.layout: the hyperparameters and the expert tensors


def test_hyperparameter_of_the_wrong_type(model):
    """The issue's traceback: an integer the reader needs, read as another type (or missing)."""
    import gguf

    data, lay, write, _ = model
    as_float = patched(data, lay.find("kv 'qwen3moe.block_count' type"), 6)
    _refused(write(as_float), "qwen3moe.block_count is 2.8", "(float), expected an integer")
    renamed = patched(data, lay.find("kv 'qwen3moe.block_count' key"), b"qwen3moe.block_coun7")
    _refused(write(renamed), "GGUF without qwen3moe.block_count")
    src = model[3]
    T = gguf.GGUFValueType
    for i, (key, value, vtype, needle) in enumerate(
        [
            ("qwen3moe.embedding_length", True, T.BOOL, "qwen3moe.embedding_length is True (bool)"),
            ("qwen3moe.expert_count", "8", T.STRING, "qwen3moe.expert_count is '8' (str)"),
            ("qwen3moe.expert_used_count", 2.0, T.FLOAT32, "qwen3moe.expert_used_count is 2.0 (float)"),
        ]
    ):
        _refused(gguf_copy(src, src.parent / f"type-{i}.gguf", set_kv={key: (value, vtype)}), needle)
    _refused(
        write(_hand_made(_kv(b"general.architecture", 4, struct.pack("<I", 7)), n_kv=1)), "general.architecture is 7"
    )


def test_expert_counts(model):
    data, lay, write, _ = model
    used = lay.find("kv 'qwen3moe.expert_used_count' value")
    _refused(write(patched(data, used, 9)), "qwen3moe.expert_used_count is 9, expected 1..8")
    _refused(write(patched(data, used, 0)), "qwen3moe.expert_used_count is 0")
    count = lay.find("kv 'qwen3moe.expert_count' value")
    _refused(write(patched(data, count, 1025)), "qwen3moe.expert_count is 1025, expected 1..1024")
    _refused(write(patched(data, count, 4)), "blk.0.ffn_gate_exps.weight has shape [64, 32, 8]", "expert_count of 4")
    blocks = lay.find("kv 'qwen3moe.block_count' value")
    _refused(write(patched(data, blocks, 513)), "qwen3moe.block_count is 513, expected 1..512")
    _refused(write(patched(data, blocks, 1)), "blk.1.ffn_gate_exps.weight is in layer 1, but qwen3moe.block_count is 1")


def test_expert_tensor_shapes(model):
    """Expert tensors whose outermost dimension is not the expert count (same bytes, dims swapped)."""
    data, lay, write, _ = model
    ne1, ne2 = lay.find("tensor blk.1.ffn_up_exps.weight ne[1]"), lay.find("tensor blk.1.ffn_up_exps.weight ne[2]")
    swapped = patched(patched(data, ne1, 8), ne2, 32)
    _refused(write(swapped), "blk.1.ffn_up_exps.weight has shape [64, 8, 32]")
    ne0, ne1 = lay.find("tensor blk.0.ffn_gate_inp.weight ne[0]"), lay.find("tensor blk.0.ffn_gate_inp.weight ne[1]")
    _refused(write(patched(patched(data, ne0, 8), ne1, 64)), "blk.0.ffn_gate_inp.weight routes to 64 experts")


def test_attention_widths(model):
    """A head count that wraps llama.cpp's uint32 products, KV heads not dividing the heads."""
    data, lay, write, _ = model
    kv = lay.find("kv 'qwen3moe.attention.head_count_kv' value")
    _refused(write(patched(data, kv, 2 + (1 << 28))), "head_count 4 is not a multiple of", "head_count_kv 268435458")
    heads = lay.find("kv 'qwen3moe.attention.head_count' value")
    _refused(write(patched(data, heads, 4 + (1 << 30))), "heads of 16 x attention.head_count 1073741828 overflow")
    _refused(write(patched(data, heads, 1 << 31)), "qwen3moe.attention.head_count is 2147483648")


def test_head_geometry(model):
    """What llama.cpp's graphs assert where no tensor shape shows it: one head width (key, value,
    rotary) and projections of whole heads (a crash found by fuzzing qwen2moe and olmoe files)."""
    data, lay, write, _ = model
    key = lay.find("kv 'qwen3moe.attention.key_length' value")
    _refused(write(patched(data, key, 64)), "key_length 64, attention.value_length 16 and rope.dimension_count 64")
    value = lay.find("kv 'qwen3moe.attention.value_length' value")
    _refused(write(patched(data, value, 8)), "value_length 8", "needs one head width")
    heads = lay.find("kv 'qwen3moe.attention.head_count' value")
    _refused(
        write(patched(data, heads, 8)), "'blk.0.attn_q.weight' has shape [64, 64], but 8 heads (2 KV) of 16 need 128"
    )
    renamed = patched(data, lay.find("kv 'qwen3moe.attention.key_length' key"), b"qwen3moe.attention.key_lengtZ")
    from moespac_gguf.core.layout import read_layout

    assert read_layout(write(renamed)).n_embd == 64  # llama.cpp's default, n_embd / n_head, is 16 too


def test_latent_attention(tmp_path):
    """deepseek2 (MLA) caches one latent head of kv_lora_rank + rope dims: fuzzing its file found
    three GGML_ASSERTs behind a head_count_kv, key_length or rope.dimension_count llama.cpp trusts."""
    from moespac_gguf.demo.synthetic import SyntheticSpec, write_synthetic_moe

    data = write_synthetic_moe(tmp_path / "ds.gguf", SyntheticSpec(arch="deepseek2")).read_bytes()
    lay = gguf_fields(data)
    for i, (label, value, needle) in enumerate(
        [
            ("kv 'deepseek2.attention.head_count_kv' value", 4, "head_count_kv 4, key_length 40 and value_length 32"),
            ("kv 'deepseek2.attention.key_length' value", 48, "key_length 48"),
            ("kv 'deepseek2.attention.head_count_kv' key", b"deepseek2.attention.head_count_kZ", "head_count_kv 4"),
            (
                "kv 'deepseek2.rope.dimension_count' key",
                b"deepseek2.rope.dimension_counZ",
                "rope.dimension_count 40 leaves",
            ),
            ("kv 'deepseek2.attention.value_length_mla' key", b"deepseek2.attention.value_length_mlZ", "one without"),
        ]
    ):
        path = tmp_path / f"ds-{i}.gguf"
        path.write_bytes(patched(data, lay.find(label), value))
        _refused(path, "deepseek2: ", needle)


def test_float_hyperparameters(model):
    data, lay, write, _ = model
    eps = lay.find("kv 'qwen3moe.attention.layer_norm_rms_epsilon' value")
    _refused(write(patched(data, eps, struct.pack("<f", float("nan")))), "layer_norm_rms_epsilon' is nan")
    _refused(write(patched(data, eps, struct.pack("<f", -1.0))), "layer_norm_rms_epsilon' is -1.0", "0 or more")
    base = lay.find("kv 'qwen3moe.rope.freq_base' value")
    _refused(write(patched(data, base, struct.pack("<f", float("inf")))), "'qwen3moe.rope.freq_base' is inf")


def test_optional_hyperparameters(model, tmp_path):
    """Keys llama.cpp GGML_ASSERTs on when present: rope scaling type, MTP layers, expert groups."""
    import gguf

    _, _, _, src = model
    T = gguf.GGUFValueType
    for i, (kv, needle) in enumerate(
        [
            ({"qwen3moe.rope.scaling.type": ("cubic", T.STRING)}, "rope.scaling.type is 'cubic'"),
            ({"qwen3moe.nextn_predict_layers": (3, T.UINT32)}, "nextn_predict_layers is 3, expected 0..2"),
            ({"qwen3moe.expert_group_count": (8, T.UINT32)}, "expert_group_count is 8, expected 0..7"),
            ({"qwen3moe.expert_group_count": (3, T.UINT32)}, "expert_count 8 is not a multiple of"),
            (
                {"qwen3moe.expert_group_count": (4, T.UINT32), "qwen3moe.expert_group_used_count": (4, T.UINT32)},
                "expert_group_used_count is 4, expected 1..3",
            ),
            ({"qwen3moe.rope.dimension_count": (8, T.UINT32)}, "rope.dimension_count 8 differ"),
        ]
    ):
        _refused(gguf_copy(src, tmp_path / f"opt-{i}.gguf", set_kv=kv), needle)
    ok = gguf_copy(src, tmp_path / "ok.gguf", set_kv={"qwen3moe.rope.scaling.type": ("yarn", T.STRING)})
    from moespac_gguf.core.layout import read_layout

    assert read_layout(ok).n_expert == 8  # the copy itself is fine
