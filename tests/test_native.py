"""The package refuses a llama-cpp-python without our patches, in one line."""

import pytest

from moespac_gguf import MoespacError
from moespac_gguf.llama.abi import ABI_VERSION, check_abi, lib


class _Fn:
    def __init__(self, value):
        self.value = value

    def __call__(self):
        return self.value


class _Lib:
    """Stands in for a CDLL: only the attribute lookup matters to check_abi."""

    def __init__(self, version=None):
        if version is not None:
            self.llama_moespac_abi_version = _Fn(version)


def test_installed_build_is_patched():
    assert check_abi(lib) == ABI_VERSION


def test_stock_build_is_refused():
    with pytest.raises(MoespacError, match="stock build.*scripts/setup.sh"):
        check_abi(_Lib())


def test_other_abi_is_refused():
    with pytest.raises(MoespacError, match=f"ABI {ABI_VERSION + 1}, this package needs {ABI_VERSION}"):
        check_abi(_Lib(ABI_VERSION + 1))


def test_a_file_llama_cpp_refuses_is_one_line_naming_its_reason(tiny_moe, tmp_path):
    """Our reader passes a file whose output norm is missing; llama.cpp refuses it, and the error
    says why (its "error loading model" line, not the generic one logged after it)."""
    from moespac_gguf.llama.session import Session

    data = tiny_moe().read_bytes()
    at = data.index(b"output_norm.weight")
    bad = tmp_path / "no-norm.gguf"
    bad.write_bytes(data[:at] + b"output_norX.weight" + data[at + 18 :])
    with pytest.raises(MoespacError, match=r"^llama.cpp could not load .*tensor 'output_norm.weight' not found$"):
        Session(bad, n_ctx=64)
