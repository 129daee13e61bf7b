"""Checkpoints users bring: a Hugging Face model directory or a llama.cpp GGUF file.

Both are read through one streaming interface, :class:`Checkpoint`: an HF-style config
dict, tensor names in Hugging Face's layout (``model.layers.N.self_attn.q_proj.weight``),
shapes in PyTorch ``[out, in]`` order, and tensors read one at a time as float32 (seek and
read one tensor; a GGUF is memory-mapped, never loaded whole). A quantized GGUF tensor
also gives the file's own bits (:class:`QuantizedTensor`). Tokenizer files, the chat
template and the bos/eos ids travel with the weights so a build can ship them.

``open_checkpoint(path)`` picks :class:`HFCheckpoint` for a directory and
:class:`GGUFCheckpoint` for a ``.gguf`` file. Everything a user can get wrong (a missing
file, malformed JSON, a truncated shard, an unsupported dtype or quantization) is a
one-line :class:`~bluelower.errors.BlueLowerError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ... import cache
from ...errors import BlueLowerError
from ...files import file_sha256
from .weights import SafetensorsFile

GGUF_MAGIC = b"GGUF"
QUANT_GROUP_SIZE = 32  # elements per block in Q4_0 / Q4_1 / Q8_0


# ----------------------------------------------------------------------------------------
# The common interface
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedTensor:
    """A GGUF block-quantized weight as the file stores it, rows in Hugging Face order.

    ``shape`` is (N, K) with K a multiple of ``group_size`` (32); each row is cut into K/32
    groups that share one float16 scale ``d`` (and, for q4_1, one float16 offset ``m``).
    ``codes[n, k]`` is the integer code of element (n, k), ``scales``/``mins`` are
    [N, K/32]. Dequantization, computed in float32 (``d`` and ``m`` widened first):

    - ``q4_0``: ``w = d * (q - 8)``, ``q`` uint8 in 0..15
    - ``q4_1``: ``w = d * q + m``,  ``q`` uint8 in 0..15
    - ``q8_0``: ``w = d * q``,      ``q`` int8 in -128..127

    :meth:`dequantize` applies exactly this and equals ``gguf.quants.dequantize`` bit for bit.
    """

    kind: str
    shape: tuple
    group_size: int
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        """float32 [N, K] by the rule in the class docstring."""
        n, k = self.shape
        groups = k // self.group_size
        d = self.scales.astype(np.float32).reshape(n, groups, 1)
        if self.kind == "q4_0":
            q = (self.codes.astype(np.int8) - np.int8(8)).astype(np.float32)
            w = d * q.reshape(n, groups, self.group_size)
        elif self.kind == "q4_1":
            q = self.codes.astype(np.float32).reshape(n, groups, self.group_size)
            w = d * q + self.mins.astype(np.float32).reshape(n, groups, 1)
        elif self.kind == "q8_0":
            w = d * self.codes.astype(np.float32).reshape(n, groups, self.group_size)
        else:
            raise ValueError(f"unknown quantization kind {self.kind!r}")
        return w.reshape(n, k)


class Checkpoint(ABC):
    """What every checkpoint reader offers; see :class:`HFCheckpoint`, :class:`GGUFCheckpoint`.

    ``config`` is an HF-style config dict. ``names()`` lists tensors by Hugging Face name,
    ``shape(name)`` is PyTorch order, ``source_dtype(name)`` the file's own type ("BF16",
    "Q4_1", ...). ``read(name)`` returns one tensor as a fresh float32 array (only that
    tensor is read; an integer buffer keeps its integer dtype); ``read_quantized(name)`` the
    file's quantized bits, or None for a float tensor. ``sha256()`` identifies the weight bytes (cached: the files may be large).
    ``special_tokens`` is ``{"bos_token_id": int | None, "eos_token_ids": [int, ...]}``.
    """

    path: str
    config: dict

    @abstractmethod
    def names(self) -> list[str]:
        raise NotImplementedError

    @abstractmethod
    def shape(self, name: str) -> tuple:
        raise NotImplementedError

    @abstractmethod
    def source_dtype(self, name: str) -> str:
        raise NotImplementedError

    @abstractmethod
    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def read_quantized(self, name: str) -> QuantizedTensor | None:
        return None

    @abstractmethod
    def sha256(self) -> str:
        raise NotImplementedError

    @abstractmethod
    def tokenizer_json(self) -> str | None:
        """The Hugging Face ``tokenizers`` JSON of this checkpoint's tokenizer, or None."""
        raise NotImplementedError

    @property
    @abstractmethod
    def chat_template(self) -> str | None:
        raise NotImplementedError

    @property
    @abstractmethod
    def special_tokens(self) -> dict:
        raise NotImplementedError

    def write_tokenizer_json(self, path: str) -> bool:
        """Write :meth:`tokenizer_json` to ``path``; False (nothing written) when there is none."""
        text = self.tokenizer_json()
        if text is None:
            return False
        tmp = f"{path}.{os.getpid()}.partial"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
        return True

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def close(self) -> None:
        """Release open files (a GGUF's memory map); the object is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


def open_checkpoint(path: str) -> Checkpoint:
    """:class:`HFCheckpoint` for a directory, :class:`GGUFCheckpoint` for a GGUF file (or a
    directory without config.json holding exactly one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        ggufs = [f for f in os.listdir(path) if f.lower().endswith(".gguf")]
        if not os.path.exists(os.path.join(path, "config.json")) and len(ggufs) == 1:
            return GGUFCheckpoint(os.path.join(path, ggufs[0]))  # a GGUF repository checkout
        return HFCheckpoint(path)
    if not os.path.exists(path):
        raise BlueLowerError(f"checkpoint not found: {path}")
    if path.lower().endswith(".gguf") or _starts_with(path, GGUF_MAGIC):
        return GGUFCheckpoint(path)
    raise BlueLowerError(
        f"{path}: not a checkpoint (give a Hugging Face model directory with config.json, or a .gguf file)"
    )


def _starts_with(path: str, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def _content_sha256(paths: list[str]) -> str:
    """sha256 of one file, or of ``"<basename> <sha256>\\n"`` lines for several (shards).

    Each file's digest is remembered by (real path, size, mtime) in this process and, unless
    caching is off, in the cache directory: hashing a multi-GB checkpoint takes seconds."""
    digests = [_file_sha256_cached(p) for p in paths]
    if len(paths) == 1:
        return digests[0]
    lines = "".join(f"{os.path.basename(p)} {d}\n" for p, d in zip(paths, digests))
    return hashlib.sha256(lines.encode()).hexdigest()


_SHA_MEMO: dict = {}


def _file_sha256_cached(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
    where = cache.result_dir("checksums")
    stored = os.path.join(where, key) if where else None
    digest = None
    if stored and os.path.isfile(stored):
        with open(stored, encoding="ascii") as fh:
            digest = fh.read().strip() or None
    if digest is None:
        digest = file_sha256(path)
        if stored:
            os.makedirs(where, exist_ok=True)
            tmp = f"{stored}.{os.getpid()}.partial"  # processes hashing the same file do not collide
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(digest)
            os.replace(tmp, stored)
    _SHA_MEMO[key] = digest
    return digest


def _read_json(path: str, what: str) -> dict:
    """The JSON object in ``path``; a one-line error when it is missing, malformed or not an object."""
    from ...validate import read_json

    value = read_json(path, what)
    if not isinstance(value, dict):
        raise BlueLowerError(f"{path}: {what} is not a JSON object")
    return value


def _unique_ids(*groups) -> list[int]:
    """Token ids from several sources (an int, a list of ints or None each), first seen first."""
    out: list[int] = []
    for group in groups:
        for value in group if isinstance(group, (list, tuple)) else [group]:
            if isinstance(value, int) and not isinstance(value, bool) and value not in out:
                out.append(value)
    return out


# ----------------------------------------------------------------------------------------
# Hugging Face directories
# ----------------------------------------------------------------------------------------

class HFCheckpoint(Checkpoint):
    """A Hugging Face model directory: ``config.json`` plus ``model.safetensors`` or a
    sharded checkpoint (``model.safetensors.index.json`` and its shards).

    Requires: ``path`` is such a directory; tensors are F32, F16 or BF16 (read as float32)
    or integer buffers (I8/U8/I16/I32/I64, read in their own dtype).
    Ensures: every shard header is checked at open (missing shard, truncation, dtype), so
    a later :meth:`read` only fails if the files change underneath. Tokenizer files are
    optional: ``tokenizer.json``, ``tokenizer_config.json`` (chat template, special
    tokens), ``chat_template.jinja`` and ``generation_config.json`` are used when present.
    """

    WEIGHTS = "model.safetensors"
    INDEX = "model.safetensors.index.json"

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            what = "is not a directory" if os.path.exists(self.path) else "not found"
            raise BlueLowerError(f"Hugging Face checkpoint directory {what}: {self.path}")
        self.config = _read_json(os.path.join(self.path, "config.json"), "config.json")
        self._files = self._open_weights()
        self._where = {name: f for f in self._files for name in f.tensors}
        self._sha256: str | None = None

    def _open_weights(self) -> list[SafetensorsFile]:
        single, index = os.path.join(self.path, self.WEIGHTS), os.path.join(self.path, self.INDEX)
        if os.path.isfile(single):
            return [SafetensorsFile(single)]
        if not os.path.isfile(index):
            raise BlueLowerError(f"{self.path}: no {self.WEIGHTS} or {self.INDEX} (only safetensors checkpoints are read)")
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BlueLowerError(f"{index}: no 'weight_map' object naming the shards")
        files = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            shard_path = os.path.join(self.path, shard)
            if os.path.basename(shard) != shard or not os.path.isfile(shard_path):
                raise BlueLowerError(f"{index}: shard '{shard}' is missing from {self.path}")
            files[shard] = SafetensorsFile(shard_path)
        for name, shard in weight_map.items():
            if name not in files[str(shard)].tensors:
                raise BlueLowerError(f"{index}: tensor '{name}' is listed in shard '{shard}' but not stored there")
        return list(files.values())

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise BlueLowerError(f"{self.path}: no tensor '{name}' in the checkpoint") from None

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple:
        return self._file(name).tensors[name][1]

    def source_dtype(self, name: str) -> str:
        return self._file(name).tensors[name][0]

    def read(self, name: str) -> np.ndarray:
        return self._file(name).read(name)

    def sha256(self) -> str:
        """sha256 of ``model.safetensors``; for shards, of their ``"<name> <sha256>"`` lines."""
        if self._sha256 is None:
            self._sha256 = _content_sha256(sorted(f.path for f in self._files))
        return self._sha256

    # -- tokenizer ----------------------------------------------------------------------

    def _optional_json(self, filename: str) -> dict:
        path = os.path.join(self.path, filename)
        return _read_json(path, filename) if os.path.isfile(path) else {}

    @property
    def tokenizer_json_path(self) -> str | None:
        path = os.path.join(self.path, "tokenizer.json")
        return path if os.path.isfile(path) else None

    def tokenizer_json(self) -> str | None:
        path = self.tokenizer_json_path
        if path is None:
            return None
        with open(path, encoding="utf-8") as fh:
            return fh.read()

    @property
    def chat_template(self) -> str | None:
        """``chat_template.jinja`` (the newer layout) or ``tokenizer_config.json``'s
        ``chat_template`` (a string, or a list of named templates: the "default" one)."""
        jinja = os.path.join(self.path, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as fh:
                return fh.read()
        template = self._optional_json("tokenizer_config.json").get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        return template if isinstance(template, str) else None

    @property
    def special_tokens(self) -> dict:
        """bos: the first of generation_config.json, config.json, tokenizer_config.json.
        eos: all of them, in that order (a runtime stops on any)."""
        gen = self._optional_json("generation_config.json")
        tok_cfg = self._optional_json("tokenizer_config.json")
        ids = self._token_ids(tok_cfg.get("bos_token"), tok_cfg.get("eos_token"))
        bos = _unique_ids(gen.get("bos_token_id"), self.config.get("bos_token_id"), ids[0])
        eos = _unique_ids(gen.get("eos_token_id"), self.config.get("eos_token_id"), ids[1])
        return {"bos_token_id": bos[0] if bos else None, "eos_token_ids": eos}

    def _token_ids(self, *tokens) -> list[int | None]:
        """The ids of token strings (or ``{"content": ...}``) in tokenizer.json; None where unknown."""
        texts = [t.get("content") if isinstance(t, dict) else t for t in tokens]
        if not any(isinstance(t, str) for t in texts) or self.tokenizer_json_path is None:
            return [None] * len(texts)
        tok = _read_json(self.tokenizer_json_path, "tokenizer.json")  # read only when a token needs its id
        vocab = (tok.get("model") or {}).get("vocab")
        known = dict(vocab) if isinstance(vocab, dict) else {}
        known.update({a.get("content"): a.get("id") for a in tok.get("added_tokens") or [] if isinstance(a, dict)})
        return [known.get(t) if isinstance(t, str) else None for t in texts]


# ----------------------------------------------------------------------------------------
# GGUF files
# ----------------------------------------------------------------------------------------

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# general.architecture -> (HF class, model_type, llama.cpp permuted q/k rows for its RoPE)
_GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),  # NEOX-style RoPE: llama.cpp keeps HF row order
}
_GGUF_FLOAT_TYPES = ("F32", "F16")
_GGUF_QUANT_TYPES = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}
# block bytes: [d f16][m f16 (q4_1 only)][codes]; 4-bit codes hold elements j and j+16 in byte j
_GGUF_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


def _hf_name_of_gguf(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in ("weight", "bias"):
        inner = _GGUF_LAYER_NAMES.get(parts[2])
        if inner is not None:
            return f"model.layers.{int(parts[1])}.{inner}.{parts[3]}"
    return None


def _rope_rows_to_hf(n_rows: int, n_head: int) -> np.ndarray:
    """Row order undoing llama.cpp's q/k permutation: ``hf = gguf[perm]``.

    llama.cpp's converter (``LlamaModel.permute``) interleaves each head's two rotary halves
    for its RoPE: ``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``. Inverting it is
    ``reshape(n_head, d/2, 2, ...).swapaxes(1, 2)`` (as transformers' GGUF loader does)."""
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def _float32_value(value: float) -> float:
    """A GGUF float32 as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


# GGUF value types (gguf.GGUFValueType) -> bytes of one scalar; 8: string, 9: array
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_MAX_DIMS = 8
_GGUF_MAX_NESTING = 4


def check_gguf_layout(path: str) -> None:
    """Walk a GGUF (v2/v3) header with every count and length checked against the bytes
    left in the file, so a damaged file is one line before the ``gguf`` reader (which
    allocates as many entries as a count says) sees it. Checks: the version, the key/value
    section (strings, scalars, arrays nested at most 4 deep), the tensor infos (at most 8
    dimensions, each tensor's data inside the file)."""
    import mmap
    import struct

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        pos = 0

        def fail(what: str):
            raise BlueLowerError(f"{path}: damaged or truncated GGUF file ({what} at byte {pos})")

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n < 0 or pos + n > size:
                fail(f"{what} runs past the end of the file")
            start = pos
            pos += n
            return start

        def u32(what):
            return struct.unpack_from("<I", buf, take(4, what))[0]

        def u64(what):
            return struct.unpack_from("<Q", buf, take(8, what))[0]

        def string(what):
            n = u64(f"{what}'s length")
            start = take(n, what)
            try:
                bytes(buf[start:pos]).decode("utf-8")
            except UnicodeDecodeError:
                fail(f"{what} is not UTF-8")
            return n

        def value(vtype: int, depth: int, what: str):
            if vtype in _GGUF_SCALAR_BYTES:
                take(_GGUF_SCALAR_BYTES[vtype], what)
            elif vtype == 8:
                string(what)
            elif vtype == 9:
                if depth >= _GGUF_MAX_NESTING:
                    fail(f"{what}: arrays nested more than {_GGUF_MAX_NESTING} deep")
                etype, count = u32(f"{what}'s element type"), u64(f"{what}'s length")
                if etype in _GGUF_SCALAR_BYTES:
                    take(count * _GGUF_SCALAR_BYTES[etype], what)
                elif etype in (8, 9):
                    if count * 8 > size - pos:  # every element takes at least 8 bytes
                        fail(f"{what}: {count} elements cannot fit the file")
                    for _ in range(count):
                        value(etype, depth + 1, what)
                else:
                    fail(f"{what}: unknown element type {etype}")
            else:
                fail(f"{what}: unknown value type {vtype}")

        take(4, "magic")
        version = u32("version")
        if version not in (2, 3):
            fail(f"version {version} (supported: 2, 3)")
        n_tensors, n_kv = u64("tensor count"), u64("key count")
        if n_kv * 12 > size - pos or n_tensors * 24 > size - pos:
            fail(f"{n_kv} keys / {n_tensors} tensors cannot fit the file")
        alignment = 32
        for i in range(n_kv):
            start = pos
            string(f"key {i}")
            key = bytes(buf[start + 8:pos])
            vtype = u32(f"key {i}'s type")
            vstart = pos
            value(vtype, 0, f"value of key {i}")
            if key == b"general.alignment" and vtype == 4:
                alignment = struct.unpack_from("<I", buf, vstart)[0]
                if alignment == 0 or alignment & (alignment - 1):
                    fail(f"general.alignment {alignment} is not a power of two")
        extents = []
        for i in range(n_tensors):
            string(f"tensor {i}'s name")
            n_dims = u32(f"tensor {i}'s dimension count")
            if not 1 <= n_dims <= _GGUF_MAX_DIMS:
                fail(f"tensor {i} has {n_dims} dimensions (1 to {_GGUF_MAX_DIMS})")
            elements = 1
            for _ in range(n_dims):
                elements *= u64(f"tensor {i}'s shape")
            u32(f"tensor {i}'s type")
            offset = u64(f"tensor {i}'s offset")
            extents.append((i, offset, elements))
        data_start = -(-pos // alignment) * alignment
        for i, offset, elements in extents:
            # at least half a byte per element (the smallest format here is 4-bit)
            if data_start + offset + elements // 2 > size:
                pos = data_start + offset
                fail(f"tensor {i}'s data ({elements} elements) runs past the end of the file")
    finally:
        buf.close()


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file of a LLaMA-family model (``general.architecture`` llama or qwen2).

    Requires: the ``gguf`` package; tensors of type F32, F16, Q4_0, Q4_1 or Q8_0, all with a
    Hugging Face name (token_embd, blk.N.{attn_*, ffn_*}, output_norm, output).
    Ensures: ``config`` is an HF config dict (``LlamaForCausalLM``/``Qwen2ForCausalLM``),
    names and ``[out, in]`` shapes are Hugging Face's, and LLaMA q/k rows are un-permuted
    back to Hugging Face order in :meth:`read` and :meth:`read_quantized` alike. The file
    is memory-mapped; each read touches only that tensor's bytes.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            what = "is not a file" if os.path.exists(self.path) else "not found"
            raise BlueLowerError(f"GGUF file {what}: {self.path}")
        if os.path.getsize(self.path) < 24 or not _starts_with(self.path, GGUF_MAGIC):
            raise BlueLowerError(f"{self.path}: not a GGUF file (no 'GGUF' magic at its start)")
        try:
            from gguf import GGUFReader
        except ImportError:
            raise BlueLowerError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
        check_gguf_layout(self.path)  # before the reader: its lists are as long as the file says
        try:
            self._reader = GGUFReader(self.path)
        except Exception as exc:  # the reader raises ValueError/KeyError/IndexError on damaged files
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BlueLowerError(f"{self.path}: damaged or truncated GGUF file ({reason})") from None
        self.architecture = self._field("general.architecture")
        if self.architecture not in _GGUF_ARCHITECTURES:
            raise BlueLowerError(
                f"{self.path}: unsupported GGUF architecture {self.architecture!r} (supported: {', '.join(_GGUF_ARCHITECTURES)})"
            )
        self._tensors = {}  # HF name -> ReaderTensor
        for tensor in self._reader.tensors:
            hf_name = _hf_name_of_gguf(tensor.name)
            if hf_name is None:
                hint = " (llama3-style rope scaling is not supported)" if tensor.name == "rope_freqs.weight" else ""
                raise BlueLowerError(f"{self.path}: tensor '{tensor.name}' has no Hugging Face name{hint}")
            kind = tensor.tensor_type.name
            if kind not in _GGUF_FLOAT_TYPES and kind not in _GGUF_QUANT_TYPES:
                raise BlueLowerError(
                    f"{self.path}: tensor '{tensor.name}' has unsupported type {kind} (supported: F32, F16, Q4_0, Q4_1, Q8_0)"
                )
            self._tensors[hf_name] = tensor
        self.config = self._hf_config()
        self._sha256: str | None = None
        self._tokenizer_json: str | None = None

    # -- metadata -----------------------------------------------------------------------

    def _field(self, key: str, default=None):
        from gguf import GGUFValueType

        field = self._reader.get_field(key)
        if field is None:
            return default
        value = field.contents()
        return _float32_value(value) if field.types == [GGUFValueType.FLOAT32] else value

    def _arch_field(self, key: str, default=None):
        return self._field(f"{self.architecture}.{key}", default)

    def _hf_config(self) -> dict:
        hf_class, model_type, _permuted = _GGUF_ARCHITECTURES[self.architecture]
        required = ("embedding_length", "attention.head_count", "block_count", "feed_forward_length")
        missing = [key for key in required if self._arch_field(key) is None]
        if missing:
            raise BlueLowerError(f"{self.path}: GGUF metadata lacks {', '.join(f'{self.architecture}.{k}' for k in missing)}")
        from ...validate import check_int

        for key in required + ("attention.head_count_kv", "attention.key_length", "context_length", "vocab_size"):
            value = self._arch_field(key)
            if value is not None:
                try:
                    check_int(value, 1, (1 << 31) - 1, f"{self.architecture}.{key}")
                except BlueLowerError as exc:
                    raise BlueLowerError(f"{self.path}: GGUF metadata {exc}") from None
        hidden, heads = self._arch_field("embedding_length"), self._arch_field("attention.head_count")
        kv_heads = self._arch_field("attention.head_count_kv", heads)
        q = self._tensors.get("model.layers.0.self_attn.q_proj.weight")
        # the q rows give the head width even when the file omits key_length
        head_dim = self._arch_field("attention.key_length") or (
            self._shape_of(q)[0] // heads if q is not None else hidden // heads)
        tokens = self._reader.get_field("tokenizer.ggml.tokens")
        embed = self._tensors.get("model.embed_tokens.weight")
        vocab = self._arch_field("vocab_size") or (len(tokens.data) if tokens is not None else None) or (
            self._shape_of(embed)[0] if embed is not None else None)
        config = {
            "architectures": [hf_class],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self._arch_field("feed_forward_length"),
            "num_hidden_layers": self._arch_field("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self._arch_field("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._arch_field("rope.freq_base", 10000.0),
            "max_position_embeddings": self._arch_field("context_length"),
            "vocab_size": vocab,
            # llama.cpp writes output.weight only when it differs from the embedding
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
        }
        pad = self._field("tokenizer.ggml.padding_token_id")
        if pad is not None:
            config["pad_token_id"] = pad
        if model_type == "llama":
            config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
            config["mlp_bias"] = False
        rope_type = self._arch_field("rope.scaling.type")
        if rope_type not in (None, "none"):
            scaling = {"rope_type": rope_type, "factor": self._arch_field("rope.scaling.factor", 1.0)}
            original = self._arch_field("rope.scaling.original_context_length")
            if original is not None:
                scaling["original_max_position_embeddings"] = original
            config["rope_scaling"] = scaling
        return config

    # -- tensors ------------------------------------------------------------------------

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise BlueLowerError(f"{self.path}: no tensor '{name}' in the checkpoint") from None

    @staticmethod
    def _shape_of(tensor) -> tuple:
        return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists ne[0] (the fastest) first

    def _hf_rows(self, name: str, n_rows: int) -> np.ndarray | None:
        """The row order taking this tensor to Hugging Face's, or None when it is already."""
        if not _GGUF_ARCHITECTURES[self.architecture][2]:
            return None
        if ".self_attn.q_proj." in name:
            n_head = self.config["num_attention_heads"]
        elif ".self_attn.k_proj." in name:
            n_head = self.config["num_key_value_heads"]
        else:
            return None
        if n_rows % (2 * n_head):
            raise BlueLowerError(f"{self.path}: tensor '{name}' has {n_rows} rows, not a whole number of {n_head} rotary heads")
        return _rope_rows_to_hf(n_rows, n_head)

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple:
        return self._shape_of(self._tensor(name))

    def source_dtype(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def gguf_name(self, name: str) -> str:
        """The file's own name of a tensor (``blk.0.attn_q.weight``)."""
        return self._tensor(name).name

    def read(self, name: str) -> np.ndarray:
        """float32 in Hugging Face layout; quantized tensors through ``gguf.quants.dequantize``."""
        from gguf.quants import dequantize

        tensor = self._tensor(name)
        shape = self._shape_of(tensor)
        values = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        out = np.array(values, dtype=np.float32).reshape(shape)  # a copy: never a view of the memory map
        rows = self._hf_rows(name, shape[0])
        return out if rows is None else out[rows]

    def read_quantized(self, name: str) -> QuantizedTensor | None:
        """The file's Q4_0/Q4_1/Q8_0 codes and scales, rows in Hugging Face order; None for F32/F16."""
        tensor = self._tensor(name)
        kind = _GGUF_QUANT_TYPES.get(tensor.tensor_type.name)
        if kind is None:
            return None
        shape = self._shape_of(tensor)
        n, k = shape[0], int(np.prod(shape[1:], dtype=np.int64))
        groups = k // QUANT_GROUP_SIZE
        blocks = np.array(tensor.data, dtype=np.uint8).reshape(n, groups, _GGUF_BLOCK_BYTES[kind])
        scales = blocks[..., 0:2].copy().view(np.float16).reshape(n, groups)
        mins = None
        if kind == "q8_0":
            codes = blocks[..., 2:].copy().view(np.int8).reshape(n, k)
        else:
            start = 4 if kind == "q4_1" else 2
            if kind == "q4_1":
                mins = blocks[..., 2:4].copy().view(np.float16).reshape(n, groups)
            packed = blocks[..., start:]
            codes = np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1).reshape(n, k)
        rows = self._hf_rows(name, n)
        if rows is not None:
            codes, scales = codes[rows], scales[rows]
            mins = mins[rows] if mins is not None else None
        return QuantizedTensor(kind=kind, shape=(n, k), group_size=QUANT_GROUP_SIZE,
                               codes=np.ascontiguousarray(codes), scales=np.ascontiguousarray(scales),
                               mins=None if mins is None else np.ascontiguousarray(mins))

    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = _content_sha256([self.path])
        return self._sha256

    def close(self) -> None:
        self._reader = None
        self._tensors = {}

    # -- tokenizer ----------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self._field("tokenizer.chat_template")

    @property
    def special_tokens(self) -> dict:
        """bos from ``tokenizer.ggml.bos_token_id``; eos from its eos, eot and eom ids."""
        eos = _unique_ids(*(self._field(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")))
        return {"bos_token_id": self._field("tokenizer.ggml.bos_token_id"), "eos_token_ids": eos}

    def tokenizer_json(self) -> str | None:
        """The GGUF vocabulary as a ``tokenizers`` JSON, or None when the file has none.

        Built by transformers' GGUF converter when it is installed (so it encodes exactly as
        ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), else, for a byte-level BPE
        vocabulary, by :func:`byte_level_bpe_json`."""
        if self._tokenizer_json is None:
            if self._reader.get_field("tokenizer.ggml.tokens") is None:
                return None
            try:
                from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
            except ImportError:
                self._tokenizer_json = self.builtin_tokenizer_json()
            else:
                self._tokenizer_json = _transformers_tokenizer_json(self.path, get_gguf_tokenizer, convert_gguf_tokenizer)
        return self._tokenizer_json

    def builtin_tokenizer_json(self) -> str:
        """The tokenizer JSON built without transformers: byte-level BPE ("gpt2") vocabularies
        whose pre-tokenizer is GPT-2's split; anything else is a one-line error."""
        model, pre = self._field("tokenizer.ggml.model"), self._field("tokenizer.ggml.pre")
        if model != "gpt2" or pre not in _GPT2_SPLIT_PRE_TYPES:
            raise BlueLowerError(
                f"{self.path}: converting its {model!r} tokenizer (pre-tokenizer {pre!r}) needs transformers>=5: pip install transformers"
            )
        merges = self._field("tokenizer.ggml.merges")
        if merges is None:
            raise BlueLowerError(f"{self.path}: byte-level tokenizer without tokenizer.ggml.merges")
        tokens = self._field("tokenizer.ggml.tokens")
        bos, eos = self._field("tokenizer.ggml.bos_token_id"), self._field("tokenizer.ggml.eos_token_id")
        return byte_level_bpe_json(
            tokens, merges, self._field("tokenizer.ggml.token_type") or [],
            bos_token=tokens[bos] if bos is not None and self._field("tokenizer.ggml.add_bos_token", False) else None,
            eos_token=tokens[eos] if eos is not None and self._field("tokenizer.ggml.add_eos_token", False) else None,
        )


def _transformers_tokenizer_json(path: str, get_gguf_tokenizer, convert_gguf_tokenizer) -> str:
    """transformers' own GGUF tokenizer, with the bos/eos post-processor its tokenizer class
    would install (``TokenizersBackend.update_post_processor``)."""
    try:
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
        backend, _extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except (ValueError, KeyError, IndexError, TypeError) as exc:  # the converter's words for a vocabulary it cannot take
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BlueLowerError(f"{path}: cannot convert its tokenizer: {reason}") from None
    explicit = "add_bos_token" in tokenizer_config or "add_eos_token" in tokenizer_config
    if explicit or backend.post_processor is None:
        bos = tokenizer_config.get("bos_token") if tokenizer_config.get("add_bos_token") else None
        eos = tokenizer_config.get("eos_token") if tokenizer_config.get("add_eos_token") else None
        backend.post_processor = _bos_eos_template(bos, eos, backend.token_to_id)
    return backend.to_str()


def _bos_eos_template(bos: str | None, eos: str | None, token_id):
    """A post-processor adding ``bos`` before and ``eos`` after each sequence (either may be None)."""
    from tokenizers import processors

    def sequence(piece: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in (bos,) if t] + [f"{piece}:{type_id}"] + [f"{t}:{type_id}" for t in (eos,) if t]

    specials = [(t, token_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=sequence("$A", 0), pair=sequence("$A", 0) + sequence("$B", 1),
                                         special_tokens=specials)


# llama.cpp pre-tokenizer names whose split is GPT-2's regex (smollm's extra digit split
# never changes ids: its vocabulary has no multi-digit tokens)
_GPT2_SPLIT_PRE_TYPES = (None, "default", "gpt2", "smollm")


def byte_level_bpe_json(tokens: list[str], merges: list[str], token_types: list[int],
                        bos_token: str | None = None, eos_token: str | None = None) -> str:
    """A GPT-2 style byte-level BPE ``tokenizers`` JSON from a GGUF vocabulary.

    Requires: ``tokens`` spelled in GPT-2's byte alphabet (as llama.cpp stores a "gpt2"
    vocabulary), ``merges`` as "left right" strings. Token type 3 (control) becomes a
    special added token, type 4 (user-defined) a plain added token; ``bos_token`` /
    ``eos_token``, when given, are added around every encoding.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, token_types) if kind == 3 and set(t) <= alphabet]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, token_types) if kind == 4]
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)
    tokenizer.post_processor = _bos_eos_template(bos_token, eos_token, vocab.get)
    return tokenizer.to_str()
