"""Build and install the patched llama-cpp-python into the running venv.

Why a script and not a pip requirement: we need llama-cpp-python built from its
sdist with patches/*.patch applied to its vendored llama.cpp. Three caches keep
repeat runs cheap (all under $MOESPAC_CACHE, default ~/.cache/moespac-gguf):

- sdist/   the pinned sdist, checked against its sha256;
- wheels/  one built wheel per (sdist, patch set, CMAKE_ARGS) key: a second setup
           only reinstalls it (seconds);
- src/ + build/  a persistent source tree, updated file by file so unchanged
           files keep their mtimes, and a persistent CMake build directory per
           CMAKE_ARGS: a .cpp-only patch change rebuilds in seconds.

CMAKE_ARGS from the environment is honoured (e.g. -DGGML_METAL=ON on a Mac,
-DGGML_CUDA=ON on a Jetson).

`--stock TARGET` builds one of llama.cpp's own programs (e.g. llama-bench) from the same
vendored source WITHOUT our patches and with llama.cpp's default options, into
stock/<CMAKE_ARGS key>/ in the cache, and prints the binary's path: the unmodified
llama.cpp that `moespac bench --no-cap` measures moespac against.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# -DLLAVA_BUILD=OFF: we never use libmtmd (saves ~1.5 min).
# -DGGML_LLAMAFILE=OFF: llamafile's sgemm computes multi-row batches in another
# accumulation order than single rows (measured 1e-7 in router logits, enough to
# flip near-tied top-k choices later), so a speculative verification batch would
# not reproduce the target's own greedy output; without it every batch size uses
# the same vec_dot kernels.
DEFAULT_CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_LLAMAFILE=OFF"

ROOT = Path(__file__).resolve().parent.parent
PATCHES = sorted((ROOT / "patches").glob("*.patch"))
CACHE = Path(os.environ.get("MOESPAC_CACHE", Path.home() / ".cache" / "moespac-gguf"))
MARKER = Path(sys.prefix) / "moespac-llama-build-key"


def say(msg: str) -> None:
    print(f"[build-llama] {msg}", flush=True)


def die(msg: str) -> None:
    print(f"[build-llama] error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def short_hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def fetch_sdist() -> Path:
    sdist_dir = CACHE / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{VERSION}.tar.gz"
    if sdist.exists() and sha256_file(sdist) == SDIST_SHA256:
        return sdist
    sdist_dir.mkdir(parents=True, exist_ok=True)
    say(f"downloading llama-cpp-python {VERSION} sdist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            "llama-cpp-python",
            f"llama-cpp-python=={VERSION}",
            "-d",
            str(sdist_dir),
        ],
        check=True,
    )
    if sha256_file(sdist) != SDIST_SHA256:
        die(f"{sdist} does not have the pinned sha256 {SDIST_SHA256}")
    return sdist


def patched_tree(sdist: Path, into: Path) -> Path:
    """Unpack a pristine sdist into `into` and apply every patch, failing loudly."""
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    src = into / f"llama_cpp_python-{VERSION}"
    for patch in PATCHES:
        for dry in (True, False):
            cmd = ["patch", "-p1", "--forward", "--no-backup-if-mismatch", "-r", "-", "-i", str(patch)]
            res = subprocess.run(cmd + (["--dry-run"] if dry else []), cwd=src, capture_output=True, text=True)
            if res.returncode != 0:
                die(f"{patch.name} does not apply to llama-cpp-python {VERSION}:\n" + res.stdout + res.stderr)
        say(f"applied {patch.name}")
    return src


def sync_tree(src: Path, dst: Path) -> int:
    """Make dst equal to src, rewriting only files whose bytes differ (keeps mtimes)."""
    changed = 0
    for dirpath, _, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            s, d = Path(dirpath) / name, dst / rel / name
            if not d.exists() or not filecmp.cmp(s, d, shallow=False):
                shutil.copy2(s, d)
                os.utime(d)  # newer than any object built from the old content
                changed += 1
    for dirpath, _, files in os.walk(dst, topdown=False):
        rel = Path(dirpath).relative_to(dst)
        for name in files:
            if not (src / rel / name).exists():
                (Path(dirpath) / name).unlink()
                changed += 1
        if not (src / rel).exists():
            Path(dirpath).rmdir()
    return changed


def build_wheel(src: Path, build_dir: Path, wheel_dir: Path, cmake_args: str) -> None:
    log = CACHE / "build.log"
    env = dict(
        os.environ,
        CMAKE_ARGS=cmake_args,
        CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2)),
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-v",
        "--no-deps",
        "--no-build-isolation",
        f"--config-settings=build-dir={build_dir}",
        "-w",
        str(wheel_dir),
        str(src),
    ]
    say(f"building llama-cpp-python (CMAKE_ARGS={cmake_args!r}); full log: {log}")
    progress = re.compile(r"^\s*\[(\d+)/(\d+)\]")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            m = progress.match(line)
            if m and sys.stdout.isatty():
                print(f"\r[build-llama] compiling {m.group(1)}/{m.group(2)}", end="", flush=True)
        rc = proc.wait()
    if sys.stdout.isatty():
        print()
    if rc != 0:
        tail = "".join(open(log).readlines()[-40:])
        die(f"build failed (exit {rc}); last lines of {log}:\n{tail}")


def main() -> None:
    cmake_args = " ".join(f"{DEFAULT_CMAKE_ARGS} {os.environ.get('CMAKE_ARGS', '')}".split())  # one spelling, one key
    key = short_hash(
        VERSION.encode(),
        SDIST_SHA256.encode(),
        cmake_args.encode(),
        *(p.name.encode() + b"\0" + p.read_bytes() for p in PATCHES),
    )
    if MARKER.exists() and MARKER.read_text().strip() == key:
        say(f"patched llama-cpp-python {VERSION} is installed (build {key})")
        return
    wheel_dir = CACHE / "wheels" / key
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if not wheels:
        sdist = fetch_sdist()
        with tempfile.TemporaryDirectory() as tmp:
            fresh = patched_tree(sdist, Path(tmp))
            src = CACHE / "src" / f"llama_cpp_python-{VERSION}"
            n = sync_tree(fresh, src)
            say(f"source tree {src}: {n} files changed")
        build_dir = CACHE / "build" / short_hash(cmake_args.encode())
        build_wheel(src, build_dir, wheel_dir, cmake_args)
        wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    else:
        say(f"reusing cached wheel {wheels[-1].name} (build {key})")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheels[-1])], check=True
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "typing-extensions>=4.5.0", "diskcache>=5.6.1"], check=True
    )
    MARKER.write_text(key + "\n")
    say(f"installed patched llama-cpp-python {VERSION} (build {key})")


def build_stock(target: str) -> Path:
    """llama.cpp's own `target` built from the pristine vendored source (no patches, llama.cpp's
    default CMake options plus CMAKE_ARGS), cached; returns the binary."""
    cmake_args = os.environ.get("CMAKE_ARGS", "").split()
    root = CACHE / "stock" / short_hash(VERSION.encode(), SDIST_SHA256.encode(), " ".join(cmake_args).encode())
    binary = root / "build" / "bin" / target
    if binary.exists():
        return binary
    src = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not src.exists():
        with tarfile.open(fetch_sdist()) as tar:
            tar.extractall(root, filter="data")
    log = root / "build.log"
    say(f"building stock llama.cpp {target} (unpatched, {' '.join(cmake_args) or 'default options'}); log: {log}")
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    with open(log, "w") as out:
        for cmd in (
            ["cmake", "-S", str(src), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF"]
            + cmake_args,
            ["cmake", "--build", str(root / "build"), "--target", target, "-j", jobs],
        ):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                die(f"stock {target} build failed; last lines of {log}:\n" + "".join(open(log).readlines()[-30:]))
    return binary


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stock"] and len(sys.argv) == 3:
        print(build_stock(sys.argv[2]))
    elif len(sys.argv) > 1:
        die("usage: build_llama_cpp.py [--stock TARGET]")
    else:
        main()
