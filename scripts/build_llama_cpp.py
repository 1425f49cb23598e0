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

A killed run (even `kill -9`) never leaves a partial file that a later run takes for a finished
one: the sdist and the wheel are published whole (moespac_gguf/core/atomic.py), the source tree
file by file, the venv's build marker only after the install; pip builds the wheel in
build-scratch/, which the next build empties. A stock build carries a `.TARGET.building` marker
until it succeeded; one found by the next run means "extract and build again from clean". The
same command again resumes: a published wheel is reused, Ninja rebuilds what the killed build
had not finished. A lock (build.lock, stock/KEY.lock) that the build processes inherit makes a
second run wait for a build still going, a killed run's orphaned compilers included.
"""

from __future__ import annotations

import fcntl
import filecmp
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# -DLLAVA_BUILD=OFF: we never use libmtmd (saves ~1.5 min).
# -DGGML_LLAMAFILE=OFF: llamafile's sgemm computes multi-row batches in another
# accumulation order than single rows (measured 1e-7 in router logits, enough to
# flip near-tied top-k choices later), so a speculative verification batch would
# not reproduce the target's own greedy output; without it every batch size uses
# the same vec_dot kernels.
# -DGGML_RPC=ON: llama.cpp's RPC backend (another machine's memory and compute as one more ggml
# device: `moespac rpc-server`, `--rpc HOST:PORT`); small, so every variant has it.
DEFAULT_CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_LLAMAFILE=OFF -DGGML_RPC=ON"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package may not be installed yet; its core needs only the standard library
from moespac_gguf.core.atomic import atomic_path, atomic_write_text  # noqa: E402

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
    sdist = CACHE / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"
    if sdist.exists() and sha256_file(sdist) == SDIST_SHA256:
        return sdist
    say(f"downloading llama-cpp-python {VERSION} sdist")
    with tempfile.TemporaryDirectory(prefix="moespac-sdist-") as tmp_dir:
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
                tmp_dir,
            ],
            check=True,
        )
        got = Path(tmp_dir) / sdist.name
        if not got.is_file() or sha256_file(got) != SDIST_SHA256:
            die(f"the downloaded {sdist.name} does not have the pinned sha256 {SDIST_SHA256}")
        with atomic_path(sdist) as tmp:
            shutil.copyfile(got, tmp)
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
                # whole, and with its new mtime, or not at all: a half-copied file, or one with
                # the tarball's old mtime, would compare equal to nothing or fool the build
                with atomic_path(d, sync=False) as tmp:
                    shutil.copy2(s, tmp)
                    os.utime(tmp)  # newer than any object built from the old content
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


@contextmanager
def build_lock(path: Path) -> Iterator[int]:
    """An exclusive lock (its descriptor) on what builds share in the cache: the source tree, the
    CMake build directories. The build processes get the descriptor too: a build that a killed run
    left going holds the lock until it ends, so the next run waits for it instead of compiling
    beside it in the same directory (or a second setup, say of another GPU variant, for the first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another build in {path.parent} to finish (it holds {path.name})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def build_wheel(src: Path, build_dir: Path, wheel_dir: Path, cmake_args: str, lock: int) -> None:
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
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, pass_fds=(lock,)
        )
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


def cached_wheel(wheel_dir: Path) -> Path | None:
    """The complete wheel in `wheel_dir`, if there is one. publish_wheel only ever shows whole ones
    under their name; the zip check also refuses a truncated one an older script left there."""
    wheels = [w for w in sorted(wheel_dir.glob("llama_cpp_python-*.whl")) if zipfile.is_zipfile(w)]
    return wheels[-1] if wheels else None


def publish_wheel(staged: Path, wheel_dir: Path) -> Path:
    """Copy a freshly built wheel into the cache under its own name, atomically."""
    with atomic_path(wheel_dir / staged.name) as tmp:
        shutil.copyfile(staged, tmp)
    return wheel_dir / staged.name


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
    with build_lock(CACHE / "build.lock") as lock:
        install(build_or_reuse_wheel(key, cmake_args, lock), key)


def build_or_reuse_wheel(key: str, cmake_args: str, lock: int) -> Path:
    """The wheel of build `key`: cached, or built and published whole."""
    wheel_dir = CACHE / "wheels" / key
    wheel = cached_wheel(wheel_dir)
    if wheel is None:
        sdist = fetch_sdist()
        scratch = CACHE / "build-scratch"  # what a killed run left here is garbage: only the lock's holder writes
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            fresh = patched_tree(sdist, scratch)
            src = CACHE / "src" / f"llama_cpp_python-{VERSION}"
            n = sync_tree(fresh, src)
            say(f"source tree {src}: {n} files changed")
            build_dir = CACHE / "build" / short_hash(cmake_args.encode())
            build_wheel(src, build_dir, scratch / "wheel", cmake_args, lock)
            staged = sorted((scratch / "wheel").glob("llama_cpp_python-*.whl"))
            if not staged:
                die(f"pip wheel wrote no llama_cpp_python wheel; see {CACHE / 'build.log'}")
            wheel = publish_wheel(staged[-1], wheel_dir)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    else:
        say(f"reusing cached wheel {wheel.name} (build {key})")
    return wheel


def install(wheel: Path, key: str) -> None:
    MARKER.unlink(missing_ok=True)  # a killed install below must not leave a marker naming a build
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)], check=True
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "typing-extensions>=4.5.0", "diskcache>=5.6.1"], check=True
    )
    atomic_write_text(MARKER, key + "\n")
    say(f"installed patched llama-cpp-python {VERSION} (build {key})")


def build_stock(target: str) -> Path:
    """llama.cpp's own `target` built from the pristine vendored source (no patches, llama.cpp's
    default CMake options plus CMAKE_ARGS), cached; returns the binary."""
    cmake_args = os.environ.get("CMAKE_ARGS", "").split()
    root = CACHE / "stock" / short_hash(VERSION.encode(), SDIST_SHA256.encode(), " ".join(cmake_args).encode())
    binary = root / "build" / "bin" / target
    building = root / f".{target}.building"  # from before the extraction until the build succeeded
    if binary.exists() and not building.exists():
        return binary
    with build_lock(root.with_name(root.name + ".lock")) as lock:
        return _build_stock(target, cmake_args, root, binary, building, lock)


def _build_stock(target: str, cmake_args: list[str], root: Path, binary: Path, building: Path, lock: int) -> Path:
    if binary.exists() and not building.exists():  # built while this run waited for the lock
        return binary
    interrupted = building.exists()  # a killed build: a half-extracted tree, half-written objects
    root.mkdir(parents=True, exist_ok=True)
    building.touch()
    pkg = root / f"llama_cpp_python-{VERSION}"
    src = pkg / "vendor" / "llama.cpp"
    if interrupted or not src.exists():
        shutil.rmtree(pkg, ignore_errors=True)
        with tarfile.open(fetch_sdist()) as tar:
            tar.extractall(root, filter="data")  # the archive's mtimes: unchanged files stay built
    log = root / "build.log"
    say(f"building stock llama.cpp {target} (unpatched, {' '.join(cmake_args) or 'default options'}); log: {log}")
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    with open(log, "w") as out:
        for cmd in (
            ["cmake", "-S", str(src), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF"]
            + cmake_args,
            ["cmake", "--build", str(root / "build"), "--target", target, "-j", jobs]
            + (["--clean-first"] if interrupted else []),  # make would take a half-written object for built
        ):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, pass_fds=(lock,)).returncode != 0:
                die(f"stock {target} build failed; last lines of {log}:\n" + "".join(open(log).readlines()[-30:]))
    building.unlink()
    return binary


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stock"] and len(sys.argv) == 3:
        print(build_stock(sys.argv[2]))
    elif len(sys.argv) > 1:
        die("usage: build_llama_cpp.py [--stock TARGET]")
    else:
        main()
