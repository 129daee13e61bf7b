"""Weights: Hugging Face-style safetensors, read and written one tensor at a time.

Names follow the checkpoints the parts come from: ``vision_tower.vision_model.*``
(SigLIP), ``multi_modal_projector.*``, ``language_model.model.*`` and
``language_model.lm_head.weight`` (LLaMA). ``init_weights`` writes seeded random weights in
that layout; :class:`WeightSource` reads a file lazily and checks names and shapes against
the model before anything is converted.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Callable, Iterable

import numpy as np

from ... import progress
from ...errors import BlueLowerError
from ...files import file_sha256

_ST_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8", "uint8": "U8",
    "int16": "I16", "int32": "I32", "int64": "I64", "uint32": "U32", "float64": "F64",
}


def producer_threads() -> int:
    """Threads producing tensors for :func:`write_safetensors`: ``$BLUELOWER_JOBS`` or the
    usable CPUs, at most 4 (each holds one tensor in flight: <= 1 GB fp32 for the 3B model)."""
    from ...jobs import env_jobs, usable_cpus

    return max(1, min(env_jobs() or usable_cpus(), 4))


def write_safetensors(path: str, specs: Iterable[tuple[str, tuple, str]], produce: Callable[[str], np.ndarray],
                      metadata: dict | None = None, label: str = "write weights", threads: int | None = None) -> None:
    """Stream tensors into a safetensors file without holding them all in memory.

    ``specs`` gives (name, shape, dtype) for every tensor; ``produce(name)`` returns its
    array when it is written. Tensors are laid out in sorted name order (deterministic
    output for the same inputs). ``produce`` runs in threads, ``threads`` (default
    :func:`producer_threads`) pieces of work ahead of the writer, and must be thread-safe
    (NumPy's random draws and array arithmetic release the GIL: ~1.8x on 2 cores). Tensors
    made by one piece of work (a quantized weight's codes and scales) say so through
    ``produce.work_key(name)``: only distinct keys count against the lookahead.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    specs = sorted(specs, key=lambda s: s[0])
    header: dict = {}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blob = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    bar = progress.Progress(label, len(specs))
    threads = producer_threads() if threads is None else max(1, int(threads))
    work_key = getattr(produce, "work_key", lambda name: name)
    # extra threads: a tensor whose work another thread is doing waits in its own thread
    with open(path, "wb") as fh, ThreadPoolExecutor(4 * threads) as pool:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        todo, ahead = deque(specs), deque()

        def fill():
            while todo and len({work_key(s[0]) for s, _f in ahead} | {work_key(todo[0][0])}) <= threads:
                spec = todo.popleft()
                ahead.append((spec, pool.submit(produce, spec[0])))

        fill()
        while ahead:
            (name, shape, dtype), fut = ahead.popleft()
            arr = np.ascontiguousarray(fut.result())
            fill()
            if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise AssertionError(f"{name}: produced {arr.shape} {arr.dtype}, declared {shape} {dtype}")
            fh.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
            del arr
            bar.update(item=name)
    bar.close()


# safetensors dtypes bluelower reads. Float tensors: F32, F16 and BF16 (BF16 read as
# float32: numpy has no bfloat16); integer buffers are read in their own dtype.
ST_FLOATS = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}  # BF16: raw bits
ST_INTS = {"I8": np.dtype("i1"), "U8": np.dtype("u1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"),
           "I64": np.dtype("<i8")}
ST_NUMPY = {**ST_FLOATS, **ST_INTS}
MAX_HEADER = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB too
# what a model weight (a float32 parameter of the module) may be stored as: widened exactly
WEIGHT_DTYPES = ("F32", "F16", "BF16")


class SafetensorsFile:
    """One safetensors file: the header (a JSON object of ``{dtype, shape, data_offsets}``
    entries, optional ``__metadata__``) parsed and checked against the file at open, so a
    later :meth:`read` only fails if the file changes underneath; one-line errors naming the
    file and the tensor (bluelower's one safetensors reader: ``--weights``, Hugging Face
    shards, a build's ``params.safetensors``)."""

    def __init__(self, path: str):
        from ...validate import parse_json

        self.path = path
        if not os.path.isfile(path):
            raise BlueLowerError(f"weights file not found: {path}")
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise BlueLowerError(f"{path}: not a valid safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, MAX_HEADER):
                raise BlueLowerError(f"{path}: not a valid safetensors file (header length {header_len} exceeds "
                                     "the file; truncated?)")
            blob = fh.read(header_len)
        try:
            header = parse_json(blob, "header")
        except BlueLowerError as exc:
            detail = str(exc).removeprefix("header: ")
            raise BlueLowerError(f"{path}: not a valid safetensors file: the header is not valid JSON ({detail})") from None
        if not isinstance(header, dict):
            kind = {list: "an array", str: "a string"}.get(type(header), "a " + type(header).__name__)
            raise BlueLowerError(f"{path}: not a valid safetensors file: the header is not a JSON object ({kind})")
        self.data_start = 8 + header_len
        self.tensors: dict = {}
        spans = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            self.tensors[name] = self._checked(name, info, size)
            spans.append(self.tensors[name][2:])
        spans.sort()
        for (_b0, e0), (b1, _e1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise BlueLowerError(f"{path}: not a valid safetensors file: tensors overlap at byte "
                                     f"{self.data_start + b1}")

    def _checked(self, name: str, info, size: int) -> tuple:
        """(dtype name, shape, begin, end) of one header entry, or a one-line error."""
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                      for s in shape):
                raise TypeError
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (begin, end)):
                raise TypeError
            shape = tuple(shape)
        except (KeyError, TypeError, ValueError):
            raise BlueLowerError(f"{self.path}: tensor '{name}' has a malformed header entry "
                                 "(expected dtype, shape [non-negative integers], data_offsets [begin, end])") from None
        if not isinstance(dtype, str) or dtype not in ST_NUMPY:
            raise BlueLowerError(
                f"{self.path}: tensor '{name}' has unsupported dtype {dtype if isinstance(dtype, str) else json.dumps(dtype)} (supported: {', '.join(ST_NUMPY)})"
            )
        count = 1
        for s in shape:
            count *= s
        nbytes = count * ST_NUMPY[dtype].itemsize
        if begin < 0 or end - begin != nbytes:
            raise BlueLowerError(f"{self.path}: tensor '{name}' data offsets do not match its shape {list(shape)}")
        if self.data_start + end > size:
            raise BlueLowerError(
                f"{self.path}: truncated: tensor '{name}' ends at byte {self.data_start + end}, the file has {size}"
            )
        return dtype, shape, begin, end

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def shape(self, name: str) -> tuple:
        return self.tensors[name][1]

    def source_dtype(self, name: str) -> str:
        """The file's own dtype name (``F32``, ``BF16``, ``I8``, ...)."""
        return self.tensors[name][0]

    def read(self, name: str, widen: bool = True) -> np.ndarray:
        """The tensor: float dtypes as float32 (``widen=False``: F16 stays float16), integer
        ones in their own dtype; NaN / Inf in a float tensor are an error naming it."""
        dtype, shape, begin, end = self.tensors[name]
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + begin)
            buf = fh.read(end - begin)
        if len(buf) != end - begin:
            raise BlueLowerError(f"{self.path}: truncated while reading tensor '{name}'")
        raw = np.frombuffer(buf, dtype=ST_NUMPY[dtype])
        if dtype == "BF16":
            # bfloat16 is the top half of a float32: widen the bits, then reinterpret
            out = (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
        elif dtype in ST_FLOATS:
            out = raw.astype(np.float32 if widen or dtype == "F32" else np.float16)
        else:
            out = raw.astype(raw.dtype.newbyteorder("="))
        return check_finite(out.reshape(shape), self.path, name)


def check_finite(arr: np.ndarray, path: str, name: str) -> np.ndarray:
    """``arr`` if it holds no NaN / Inf (float tensors; one pass, no copy), else one line."""
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr.sum(dtype=np.float64)):
        bad = int(np.flatnonzero(~np.isfinite(arr.reshape(-1)))[0])
        index = list(np.unravel_index(bad, arr.shape))
        raise BlueLowerError(f"{path}: tensor '{name}' holds {arr.reshape(-1)[bad]} at {[int(i) for i in index]} "
                             "(weights must be finite)")
    return arr


def check_weight_dtypes(path: str, dtypes: dict) -> None:
    """``dtypes``: weight name -> the file's dtype name. A model weight is stored as one of
    :data:`WEIGHT_DTYPES` (F16 / BF16 are widened to float32 exactly, said in one progress
    line); an integer tensor is not a float weight (quantized checkpoints: ``--gguf``)."""
    bad = sorted((n, d) for n, d in dtypes.items() if d not in WEIGHT_DTYPES)
    if bad:
        name, dtype = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise BlueLowerError(f"{path}: weight '{name}' is stored as {dtype}{more}; weights must be "
                             f"{', '.join(WEIGHT_DTYPES)} (quantized checkpoints: --gguf)")
    narrow = sorted({d for d in dtypes.values() if d != "F32"})
    if narrow:
        count = sum(1 for d in dtypes.values() if d != "F32")
        progress.log(f"weights: {count} of {len(dtypes)} tensors stored as {'/'.join(narrow)}, widened to float32 "
                     "(exact)")


class WeightSource(SafetensorsFile):
    """A safetensors file of weights in a module's own names (``--weights``, a build's
    ``params.safetensors``), read tensor by tensor."""

    def dtype(self, name: str) -> np.dtype:
        dtype = self.source_dtype(name)
        return np.dtype(np.float32) if dtype == "BF16" else ST_NUMPY[dtype].newbyteorder("=")

    def read(self, name: str, widen: bool = False) -> np.ndarray:
        """The tensor in its stored dtype (BF16: float32); see :meth:`SafetensorsFile.read`."""
        return super().read(name, widen=widen)

    def check_against(self, expected: dict) -> None:
        """``expected``: name -> (shape, dtype name). Missing, mis-shaped or non-float
        tensors are errors."""
        missing = sorted(set(expected) - set(self.tensors))
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise BlueLowerError(f"{self.path}: missing weight(s) {', '.join(missing[:3])}{more}")
        for name, (shape, _dtype) in expected.items():
            if self.shape(name) != tuple(shape):
                raise BlueLowerError(
                    f"{self.path}: weight '{name}' has shape {list(self.shape(name))}, the model expects {list(shape)}"
                )
        check_weight_dtypes(self.path, {n: self.source_dtype(n) for n in expected})

    def sha256(self) -> str:
        return file_sha256(self.path)


def model_weight_specs(cfg) -> dict:
    """name -> (shape, dtype) of every weight, from a meta-device model (no memory).
    Memoized per config (building the 3B meta model takes seconds; a compile asks ~4 times)."""
    import json

    return dict(_weight_specs_of(json.dumps(cfg.to_dict(), sort_keys=True), cfg))


_SPECS_MEMO: dict = {}


def _weight_specs_of(key: str, cfg) -> dict:
    if key not in _SPECS_MEMO:
        from .importer import build_meta_model

        model = build_meta_model(cfg)
        _SPECS_MEMO[key] = {n: (tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in model.named_parameters()}
    return _SPECS_MEMO[key]


def random_weight(name: str, shape: tuple, seed: int, std: float, salt: str = "") -> np.ndarray:
    """Seeded random tensor for one weight; independent of the other weights (streamable).

    Norm weights are 1 + noise and biases small noise, so LayerNorm/RMSNorm stay sane.
    Drawn as float32 normals in place (4.5x faster than float64 draws: the 3B model's
    3.1 B values are a large part of a compile without ``--weights``).
    """
    digest = hashlib.sha256(f"{salt}{seed}:{name}".encode()).digest()  # salt: another stream (benchmarks)
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    leaf = name.rsplit(".", 1)[-1]
    x = rng.standard_normal(shape, dtype=np.float32)
    if "norm" in name and leaf == "weight":
        x *= np.float32(0.1)
        x += np.float32(1.0)
        return x
    x *= np.float32(0.1 * std if leaf == "bias" else std)
    return x


def init_weights(cfg, out_path: str, seed: int = 0) -> None:
    """Write seeded random weights for ``cfg`` to ``out_path`` (safetensors), tensor by tensor."""
    specs = model_weight_specs(cfg)
    std = cfg.runtime.init_std
    tmp = out_path + ".partial"
    try:
        write_safetensors(
            tmp,
            [(n, s, d) for n, (s, d) in specs.items()],
            lambda n: random_weight(n, specs[n][0], seed, std),
            metadata={"bluelower_model": cfg.name, "seed": seed, "format": "pt"},
            label="init-weights",
        )
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_torch_model(cfg, weights: "WeightSource | None", seed: int = 0):
    """A real (CPU, fp32) PyTorch model with the given weights (or seeded random ones).

    Used for the PyTorch reference; it materializes the weights, so it is meant for
    configs that fit in memory.
    """
    import torch

    from ..models import spec_for

    specs = model_weight_specs(cfg)
    if weights is not None:
        weights.check_against(specs)
    with torch.device("meta"):
        model = spec_for(cfg).build_module(cfg)
    state = {}
    for name, (shape, _dtype) in specs.items():
        arr = weights.read(name) if weights is not None else random_weight(name, shape, seed, cfg.runtime.init_std)
        state[name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    model.load_state_dict(state, assign=True)
    return model.eval()
