"""One llama.cpp model + context on the low-level API, with the routing tap.

The speculative loop needs what `llama_cpp.Llama` does not give: logits for
every position of a batch, KV rollback, and the routing of every decode. This
class is that thin layer and nothing more: no sampling, no speculation.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.errors import MoespacError
from ..core.gguf import check_gguf
from ..core.mapping import Mapping
from ..core.routing import Routing
from .abi import MappingEntry, clear_log, last_log_line, lib, llama_cpp
from .devices import cpu_buffer_type, gpu_devices, pick_gpu
from .rpc import Link, add_servers, usable_devices
from .tap import RoutingTap

L = llama_cpp  # the low-level bindings (llama_cpp.llama_cpp re-exported by the package)

# llama.cpp's --cpu-moe pattern: every routed expert tensor (and its bias)
EXPERT_TENSORS = rb"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


class _BuftOverride(ctypes.Structure):
    """llama_model_tensor_buft_override: tensors whose name matches `pattern` go to `buft`."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class Session:
    """A loaded GGUF model with one context (sequence 0) and its KV position."""

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        tap: bool = True,
        use_mmap: bool = True,
        capture=None,
        overrides: dict[str, int] | None = None,
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        rpc_servers: Sequence[str] = (),
        n_cpu_moe: int | None = None,
        op_offload: bool = True,
        flash_attn: bool = False,
    ):
        """`capture`: an eval callback chained behind the routing tap, with `callback` and
        `name_prefixes` (llama.capture.TensorCapture, the gate's GateTap).
        `overrides`: integer metadata llama.cpp reads in place of the file's (kv_overrides),
        e.g. `{"llama.expert_used_count": 1}` for the target as its own draft.

        Devices are chosen explicitly (the devices of the RPC servers at `rpc_servers`, HOST:PORT
        endpoints, come first, as in llama.cpp; a server lost earlier is left out, llama.rpc):
        with `n_gpu_layers` 0 the model sees no GPU at all (so a GPU build computes exactly as a
        CPU-only one: llama.cpp would otherwise offload large batches' host-weight ops to any GPU
        it finds); otherwise GPU `main_gpu` holds that many
        layers (-1: all, as llama.cpp's -ngl), with the expert tensors of the first `n_cpu_moe`
        layers kept in host memory (None: every layer's, as llama.cpp's --cpu-moe, the placement
        where the residency engine manages the experts and GPU slots copy from them; N: as
        --n-cpu-moe N). `op_offload`: llama.cpp's offload of large batches' host-weight ops to
        the GPU; off for a context that gets expert slots.

        `slot_device` is where expert slots go (llama.slots) and decides the expert placement
        above: the local GPU when there is one (RPC devices then hold layers only), else the
        first RPC server's device, which then plays the GPU's part: layers there, their expert
        tensors in host memory, slots (the hot experts, computed there) in its memory.

        `flash_attn`: llama.cpp's flash attention where the device has it (its "auto"), else
        off. Off is what exact speculative decoding needs: the CPU kernel tiles a multi-token
        batch differently from a single token (measured: 1e-3 in attention output, 0.9 in
        logits after 30 layers of a Q8_0 MoE), so a verification batch would not reproduce
        the target's own token-by-token greedy output. Without it a batch of 2 matches
        single-token decoding bit for bit.
        """
        self.path = check_gguf(path)
        if n_cpu_moe is not None and n_cpu_moe < 0:
            raise MoespacError(f"--n-cpu-moe must be 0 or more, got {n_cpu_moe}")
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        mparams.use_mmap = use_mmap
        # RPC servers' devices first, as llama.cpp orders them (llama.rpc); then the local GPU
        add_servers(rpc_servers)
        remote = usable_devices(rpc_servers) if n_gpu_layers else []
        self.link = Link(remote)  # decode raises RemoteDeviceLost when one of them stops answering
        self.gpu = pick_gpu(main_gpu) if n_gpu_layers and (gpu_devices() or not remote) else None
        # the expert slots' device: the local GPU, else the first RPC server's device (issue 25)
        self.slot_device = self.gpu or (remote[0] if remote else None)
        handles = [d.handle for d in remote] + [self.gpu.handle if self.gpu else None, None]
        self._devices = (ctypes.c_void_p * len(handles))(*handles)
        mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        mparams.n_gpu_layers = n_gpu_layers
        if self.slot_device is not None and n_cpu_moe != 0:
            layers = rb"" if n_cpu_moe is None else rb"blk\.(" + b"|".join(b"%d" % i for i in range(n_cpu_moe)) + rb")"
            self._pattern = layers + EXPERT_TENSORS
            self._buft_overrides = (_BuftOverride * 2)(_BuftOverride(self._pattern, cpu_buffer_type()))
            mparams.tensor_buft_overrides = ctypes.cast(self._buft_overrides, ctypes.c_void_p)
        if overrides:
            self._overrides = (L.llama_model_kv_override * (len(overrides) + 1))()
            for slot, (key, value) in zip(self._overrides, overrides.items()):
                slot.key = key.encode()
                slot.tag = L.LLAMA_KV_OVERRIDE_TYPE_INT
                slot.value.val_i64 = int(value)
            mparams.kv_overrides = self._overrides
        clear_log()
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            why = last_log_line("error loading model: ") or last_log_line() or "unknown error"
            raise MoespacError(f"llama.cpp could not load {self.path}: {why}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_layer = L.llama_model_n_layer(self.model)
        self.n_batch = n_batch = min(n_batch, n_ctx)  # llama.cpp clamps n_batch to n_ctx; split the same way
        used_key = f"{self.metadata('general.architecture')}.expert_used_count"
        self.n_expert_used = n_used = int((overrides or {}).get(used_key) or self.metadata(used_key) or 0)
        # the tap holds one decode call's rows: at most one batch
        self.tap = RoutingTap(self.n_layer, n_used, n_batch) if tap and n_used else None

        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        threads = n_threads or os.cpu_count() or 1
        cparams.n_threads = cparams.n_threads_batch = threads
        self.flash_attn = flash_attn
        cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.op_offload = op_offload
        if self.tap is not None:
            cparams.cb_eval = self.tap.callback
            cparams.cb_eval_user_data = self.tap.user_data
            if capture is not None:
                self.tap.chain(capture.callback, capture.name_prefixes)
        elif capture is not None:
            cparams.cb_eval = capture.callback
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise MoespacError(
                f"llama.cpp could not create a context for {self.path} (n_ctx={n_ctx}): "
                f"{last_log_line() or 'unknown error'}"
            )
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.n_past = 0
        self.last_routing: Routing | None = None
        self._logits_key: tuple[int, int] | None = None
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._eog: dict[int, bool] = {}

    # -- vocabulary -------------------------------------------------------
    def mappings(self) -> list[Mapping]:
        """Where llama.cpp mapped this model's file, as llama.cpp reports it (patch 0013): the mapped
        fragments, largest first ([] when the model was not mmapped)."""
        n = lib.llama_moespac_model_mappings(self.model, None, 0)
        entries = (MappingEntry * n)()
        lib.llama_moespac_model_mappings(self.model, entries, n)
        found = [Mapping(e.addr, e.addr + e.length, e.file_offset) for e in entries if e.file == 0 and e.length]
        return sorted(found, key=lambda m: m.start - m.end)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            buf = (L.llama_token * -n)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The token's text (cached: a streamed token costs a dict lookup, not a call into llama.cpp)."""
        piece = self._pieces.get((token, special))
        if piece is None:
            piece = self._pieces[token, special] = self._token_bytes(token, special)
        return piece

    def _token_bytes(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(L.llama_vocab_is_eog(self.vocab, token))
        return eog

    @property
    def bos(self) -> int:
        return L.llama_vocab_bos(self.vocab)

    def vocab_fingerprint(self) -> str:
        """Hash of every token's text: equal fingerprints = interchangeable token ids."""
        h = hashlib.sha256()
        for t in range(self.n_vocab):
            h.update(L.llama_vocab_get_text(self.vocab, t) or b"")
            h.update(b"\0")
        return h.hexdigest()

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1024)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        t = L.llama_model_chat_template(self.model, None)
        return t.decode("utf-8") if t else None

    # -- decoding ---------------------------------------------------------
    def decode(
        self, tokens: list[int], all_logits: bool = False, routing: bool = True, copy: bool = True
    ) -> np.ndarray:
        """Append `tokens` to the KV cache; return logits [n_out, n_vocab].

        n_out is len(tokens) with all_logits (a verification batch needs every
        position), else 1 (the last token). The routing of all the tokens is
        left in `last_routing` (None with `routing` False: reading it costs ~0.1 ms a
        call, which a decode whose routing nobody reads need not pay). With `copy` False
        a one-batch call returns llama.cpp's own buffer, valid until this session's next
        decode (it spares copying the full vocabulary's logits out of another core's cache).
        """
        if not tokens:
            raise ValueError("decode() needs at least one token")
        if self.n_past + len(tokens) > self.n_ctx:
            raise MoespacError(
                f"context full: {self.n_past} + {len(tokens)} tokens exceed n_ctx={self.n_ctx} (raise -c/--ctx-size)"
            )
        logits, routes = [], []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            last = start + self.n_batch >= len(tokens)
            flags = [all_logits or (last and i == len(chunk) - 1) for i in range(len(chunk))]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = self.n_past + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = flags[i]
            if self.tap is not None:
                self.tap.reset()
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                self.link.check()
                raise MoespacError(f"llama_decode failed with code {rc}: {last_log_line()}")
            n_out = sum(flags)
            if n_out:
                view = self._logits_view(n_out)
                logits.append(view.copy() if copy or not last or start else view)
            self.link.check()  # after the logits arrived: a lost RPC server zeroed them
            if self.tap is not None and routing:
                routes.append(self.tap.read(len(chunk), np.flatnonzero(flags)))
            self.n_past += len(chunk)
        self.last_routing = Routing.concat(routes) if routes else None
        return logits[0] if len(logits) == 1 else np.concatenate(logits)

    def _logits_view(self, n_out: int) -> np.ndarray:
        """llama.cpp's logits buffer as an [n_out, n_vocab] array, the view kept while the buffer
        stays where it is (building one costs more than copying a token's logits)."""
        ptr = L.llama_get_logits(self.ctx)
        key = (ctypes.cast(ptr, ctypes.c_void_p).value, n_out)
        if key != self._logits_key:
            self._logits_key, self._logits = key, np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
        return self._logits

    def rollback(self, n_keep: int) -> None:
        """Forget every KV entry from position n_keep on (rejected draft tokens)."""
        if n_keep < self.n_past:
            L.llama_memory_seq_rm(self.memory, 0, n_keep, -1)
            self.n_past = n_keep

    def reset(self) -> None:
        L.llama_memory_clear(self.memory, True)
        self.n_past = 0

    def copy_kv_from(self, other: Session) -> None:
        """Replace this KV cache with `other`'s (the same model file): a self-draft takes the
        target's prompt instead of prefilling it again, a copy of megabytes instead of seconds of
        compute, and then attends to the target's own keys and values."""
        if other.path != self.path:
            raise ValueError("KV caches can be shared only between sessions of the same model file")
        size = L.llama_state_seq_get_size(other.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        if L.llama_state_seq_get_data(other.ctx, buf, size, 0) != size:
            raise MoespacError(f"could not read the KV cache of {other.path.name}")
        self.reset()
        if L.llama_state_seq_set_data(self.ctx, buf, size, 0) != size:
            raise MoespacError(f"could not load a KV cache into {self.path.name}: {last_log_line()}")
        self.n_past = other.n_past

    def close(self) -> None:
        if getattr(self, "ctx", None):
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = None
        if getattr(self, "tap", None) is not None:
            self.tap.close()
            self.tap = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
