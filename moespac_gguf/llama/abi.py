"""ctypes access to the moespac-patched libllama (the `llama_moespac_*` C API).

Importing this module is the check that llama-cpp-python is our patched build:
a stock build lacks the symbols, and we stop with one line telling the user how
to build the right one instead of failing later in a confusing way.
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
import time

from ..core.errors import MoespacError


def busy_cpus(samples: int = 5, interval: float = 0.002) -> int:
    """Threads of other processes running right now: the fewest seen in a few samples of
    /proc/loadavg's runnable count, less this one (0 where there is no /proc)."""
    seen = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                seen.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0
        time.sleep(interval)
    return max(0, min(seen))


def choose_wait_policy() -> str | None:
    """OMP_WAIT_POLICY for llama.cpp's OpenMP threads, set before libllama (and libgomp) loads;
    a value the user set is kept. On an idle machine libgomp's default (spin a while, then sleep)
    is the fastest; on a machine where other processes are running, threads that spin between
    graphs take CPU from them and from our own main thread, and `passive` is faster (measured on
    2 cores, single-token decode: idle 63 tok/s default vs 44 passive; one busy process beside it
    18 default vs 31 passive; docs/results.md)."""
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"]
    if busy_cpus():
        os.environ["OMP_WAIT_POLICY"] = "passive"
        return "passive"
    return None


WAIT_POLICY = choose_wait_policy()
# The llama_moespac_* ABI this package was written for (patches/ bump it).
ABI_VERSION = 10
_REBUILD_HINT = "run `bash scripts/setup.sh` (it builds llama-cpp-python 0.3.36 with patches/*.patch)"
try:
    import llama_cpp
except ImportError:
    raise MoespacError(f"llama-cpp-python is not installed; {_REBUILD_HINT}") from None


def check_abi(lib) -> int:
    """Return the library's moespac ABI version, or raise MoespacError if it is not ours."""
    fn = getattr(lib, "llama_moespac_abi_version", None)
    if fn is None:
        raise MoespacError(f"llama-cpp-python is a stock build without the moespac patches; {_REBUILD_HINT}")
    fn.restype, fn.argtypes = ctypes.c_int32, []
    version = int(fn())
    if version != ABI_VERSION:
        raise MoespacError(
            f"patched llama-cpp-python has moespac ABI {version}, this package needs {ABI_VERSION}; {_REBUILD_HINT}"
        )
    return version


class MappingEntry(ctypes.Structure):
    """struct llama_moespac_mapping (patch 0013): one mapped fragment of a model's file."""

    _fields_ = [
        ("file", ctypes.c_int32),
        ("addr", ctypes.c_void_p),
        ("file_offset", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
    ]


def _declare(lib) -> None:
    """ctypes signatures of the llama_moespac_* functions (see patches/)."""
    c = ctypes
    eval_cb = llama_cpp.llama_cpp.ggml_backend_sched_eval_callback
    sigs = {
        "llama_moespac_tap_new": (c.c_void_p, [c.c_int32, c.c_int32, c.c_int32]),
        "llama_moespac_tap_free": (None, [c.c_void_p]),
        "llama_moespac_tap_chain": (None, [c.c_void_p, eval_cb, c.c_void_p, c.c_char_p]),
        "llama_moespac_tap_reset": (None, [c.c_void_p]),
        "llama_moespac_tap_ids": (c.POINTER(c.c_int32), [c.c_void_p]),
        "llama_moespac_tap_weights": (c.POINTER(c.c_float), [c.c_void_p]),
        "llama_moespac_tap_rows": (c.POINTER(c.c_int32), [c.c_void_p]),
        "llama_moespac_tap_overflow": (c.c_int32, [c.c_void_p]),
        "llama_moespac_tap_set_willneed": (None, [c.c_void_p, c.c_bool]),
        "llama_moespac_tap_willneed_bytes": (c.c_int64, [c.c_void_p]),
        "llama_moespac_tap_set_allowed": (None, [c.c_void_p, c.c_void_p, c.c_int32]),
        "llama_moespac_tap_rerouted": (c.c_int64, [c.c_void_p]),
        "llama_moespac_tap_set_keep": (
            None,
            [c.c_void_p, c.c_int32, c.c_void_p, c.c_void_p, c.c_int32, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p],
        ),
        "llama_moespac_tap_kept": (c.POINTER(c.c_int32), [c.c_void_p, c.POINTER(c.c_int32), c.POINTER(c.c_int32)]),
        "llama_moespac_tap_lock_failures": (c.c_int64, [c.c_void_p]),
        "llama_moespac_model_mappings": (c.c_int32, [c.c_void_p, c.POINTER(MappingEntry), c.c_int32]),
        # expert slot cache (patches 0005-0007, include/llama-moespac-slots.h)
        "llama_moespac_slots_new": (c.c_void_p, [c.c_void_p, c.POINTER(c.c_int32), c.c_int32, c.c_void_p]),
        "llama_moespac_slots_free": (None, [c.c_void_p]),
        "llama_moespac_slots_attach": (c.c_int32, [c.c_void_p, c.c_void_p]),
        "llama_moespac_slots_n_layer": (c.c_int32, [c.c_void_p]),
        "llama_moespac_slots_n_expert": (c.c_int32, [c.c_void_p]),
        "llama_moespac_slots_n_slots": (c.c_int32, [c.c_void_p, c.c_int32]),
        "llama_moespac_slots_slot_bytes": (c.c_int64, [c.c_void_p, c.c_int32]),
        "llama_moespac_slots_buffer_bytes": (c.c_int64, [c.c_void_p]),
        "llama_moespac_slots_copy_async": (c.c_int32, [c.c_void_p, c.c_int32, c.c_int32, c.c_int32]),
        "llama_moespac_slots_wait": (c.c_int32, [c.c_void_p]),
        "llama_moespac_slots_pending": (c.c_int32, [c.c_void_p]),
        "llama_moespac_slots_assign": (c.c_int32, [c.c_void_p, c.c_int32, c.c_int32, c.c_int32, c.c_int32]),
        "llama_moespac_slots_evict": (c.c_int32, [c.c_void_p, c.c_int32, c.c_int32]),
        "llama_moespac_slots_slot_of": (c.c_int32, [c.c_void_p, c.c_int32, c.c_int32]),
        "llama_moespac_slots_expert_in": (c.c_int32, [c.c_void_p, c.c_int32, c.c_int32]),
        "llama_moespac_slots_copied_bytes": (c.c_int64, [c.c_void_p]),
        "llama_moespac_slots_graph_layers": (c.c_int32, [c.c_void_p]),
        "llama_moespac_slots_last_error": (c.c_char_p, [c.c_void_p]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


lib = llama_cpp.llama_cpp._lib
check_abi(lib)
_declare(lib)

# llama.cpp logs through one global callback: keep the recent lines (to explain a
# failed load in one line) and print them only when verbose.
_log_lines: collections.deque[str] = collections.deque(maxlen=50)
_verbose = False


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data) -> None:
    line = text.decode("utf-8", errors="replace")
    _log_lines.append(line)
    if _verbose:
        sys.stderr.write(line)


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def set_verbose(verbose: bool) -> None:
    global _verbose
    _verbose = verbose


def last_log_line(containing: str = "") -> str:
    """The last non-empty line llama.cpp logged (for one-line error messages), or the text after
    `containing` on the last line that has it; always one line (a name read from a file cannot
    break it)."""
    for line in reversed(_log_lines):
        if containing in line and line.strip():
            return " ".join(line.split(containing, 1)[1].split()) if containing else " ".join(line.split())
    return ""


def clear_log() -> None:
    """Forget what llama.cpp logged so far (before a call whose failure last_log_line explains)."""
    _log_lines.clear()


# The tap's C eval callback, as a value to put in llama_context_params.cb_eval.
tap_eval_callback = ctypes.cast(lib.llama_moespac_tap_eval, llama_cpp.llama_cpp.ggml_backend_sched_eval_callback)
