"""The ggml backend devices of this build (ggml's device registry, through ctypes).

A GPU tier needs three things llama-cpp-python does not expose: which GPU devices the build
has (Vulkan, CUDA, Metal: whatever ggml registered), how much memory each has free, and the
buffer types that place a tensor on a device or keep it in host RAM. Everything here is a
generic ggml backend call, so the same code serves every backend.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import MoespacError
from .abi import llama_cpp

GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU = 0, 1, 2

_ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so"))
_SIGS = {
    "ggml_backend_dev_count": (ctypes.c_size_t, []),
    "ggml_backend_dev_get": (ctypes.c_void_p, [ctypes.c_size_t]),
    "ggml_backend_dev_type": (ctypes.c_int, [ctypes.c_void_p]),
    "ggml_backend_dev_name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_dev_description": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_dev_memory": (
        None,
        [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
    ),
    "ggml_backend_dev_buffer_type": (ctypes.c_void_p, [ctypes.c_void_p]),
    "ggml_backend_dev_by_type": (ctypes.c_void_p, [ctypes.c_int]),
    "ggml_backend_dev_backend_reg": (ctypes.c_void_p, [ctypes.c_void_p]),
    "ggml_backend_reg_name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_reg_by_name": (ctypes.c_void_p, [ctypes.c_char_p]),
    "ggml_backend_reg_get_proc_address": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
    "ggml_backend_register": (None, [ctypes.c_void_p]),
}
for _name, (_restype, _argtypes) in _SIGS.items():
    _fn = getattr(_ggml, _name)
    _fn.restype, _fn.argtypes = _restype, _argtypes


@dataclass(frozen=True)
class Device:
    """One ggml GPU device: `handle` is its ggml_backend_dev_t."""

    index: int  # among this build's GPU devices (llama.cpp's --main-gpu numbering)
    name: str
    description: str
    handle: int
    integrated: bool = False  # ggml's IGPU type: shares the host's DRAM

    @property
    def unified_memory(self) -> bool:
        """The GPU computes from the host's DRAM: an integrated GPU (Jetson, laptop iGPUs), Apple
        Silicon (Metal), or a Vulkan device on the CPU (lavapipe). A slot there is a second copy
        in the same memory, not faster memory."""
        return self.integrated or self.name.startswith("MTL") or "llvmpipe" in self.description

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes as the backend reports them now."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        _ggml.ggml_backend_dev_memory(self.handle, ctypes.byref(free), ctypes.byref(total))
        return int(free.value), int(total.value)

    @property
    def buffer_type(self) -> int:
        """The device's own buffer type (memory on the device)."""
        return int(_ggml.ggml_backend_dev_buffer_type(self.handle))


def _devices(rpc: bool) -> list[Device]:
    """GPU-type devices of the registry, in its order: the local ones, or (`rpc`) the RPC
    backend's (another machine's, llama.rpc; ggml lists them as GPUs too)."""
    llama_cpp.llama_backend_init()
    out = []
    for i in range(_ggml.ggml_backend_dev_count()):
        dev = _ggml.ggml_backend_dev_get(i)
        kind = _ggml.ggml_backend_dev_type(dev)
        if kind not in (GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU):
            continue
        if (_ggml.ggml_backend_reg_name(_ggml.ggml_backend_dev_backend_reg(dev)) == b"RPC") != rpc:
            continue
        name = _ggml.ggml_backend_dev_name(dev).decode()
        description = _ggml.ggml_backend_dev_description(dev).decode()
        out.append(Device(len(out), name, description, dev, kind == GGML_BACKEND_DEVICE_TYPE_IGPU))
    return out


def gpu_devices() -> list[Device]:
    """The build's local GPU devices in registry order (none on a CPU-only build). llama.cpp's
    backend init registers them; a Vulkan device on the CPU (lavapipe) is listed only when
    GGML_VK_VISIBLE_DEVICES names it, as ggml-vulkan decides. MOESPAC_NO_GPU=1 hides them all
    (the CPU test suite sets it, so a GPU build computes there exactly as a CPU-only one)."""
    if os.environ.get("MOESPAC_NO_GPU") == "1":
        return []
    return _devices(rpc=False)


def rpc_devices(endpoints: Sequence[str]) -> list[Device]:
    """The devices of the RPC servers at `endpoints` (added with llama.rpc.add_servers), in
    registry order. ggml keeps every server ever added to the process, so a model names the
    ones it uses (ggml-rpc gives each device its endpoint as description)."""
    return [d for d in _devices(rpc=True) if d.description in endpoints]


def pick_gpu(main_gpu: int = 0) -> Device | None:
    """GPU device `main_gpu`; None when the build has no GPU device (llama.cpp then runs on the
    CPU whatever -ngl says, and so do we, saying so once on stderr); a one-line MoespacError when
    `main_gpu` is not one of its devices."""
    gpus = gpu_devices()
    if not gpus:
        global _said_no_gpu
        if not _said_no_gpu:
            print(
                "moespac: no GPU device in this llama.cpp build (or none visible): running on the CPU; "
                "build with CMAKE_ARGS=-DGGML_VULKAN=ON, -DGGML_CUDA=ON or -DGGML_METAL=ON (Vulkan on a CPU "
                "device also needs GGML_VK_VISIBLE_DEVICES=0)",
                file=sys.stderr,
            )
            _said_no_gpu = True
        return None
    if not 0 <= main_gpu < len(gpus):
        raise MoespacError(f"--main-gpu {main_gpu}: this build has GPU devices 0..{len(gpus) - 1}")
    return gpus[main_gpu]


_said_no_gpu = False


def cpu_buffer_type() -> int:
    """The CPU device's buffer type (host RAM; file-backed when llama.cpp mmaps the model)."""
    return int(_ggml.ggml_backend_dev_buffer_type(_ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)))
