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
_NP_FROM_ST = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I16": np.int16,
               "I32": np.int32, "I64": np.int64, "U32": np.uint32, "F64": np.float64}


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


class WeightSource:
    """Lazy reader of a safetensors file: header parsed once, tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise BlueLowerError(f"weights file not found: {path}")
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise ValueError("file shorter than the 8-byte header length")
                (hlen,) = struct.unpack("<Q", raw)
                if hlen > size - 8 or hlen > 100 * 1024 * 1024:
                    raise ValueError(f"header length {hlen} exceeds the file")
                header = json.loads(fh.read(hlen))
            self.data_start = 8 + hlen
            self.header = {k: v for k, v in header.items() if k != "__metadata__"}
            for name, info in self.header.items():
                begin, end = info["data_offsets"]
                if info["dtype"] not in _NP_FROM_ST:
                    raise ValueError(f"tensor '{name}' has unsupported dtype {info['dtype']}")
                expect = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_NP_FROM_ST[info["dtype"]]).itemsize
                if end - begin != expect or self.data_start + end > size or begin < 0:
                    raise ValueError(f"tensor '{name}' data does not fit its shape or the file (truncated?)")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise BlueLowerError(f"{path}: not a valid safetensors file: {exc}") from None

    def names(self) -> list[str]:
        return sorted(self.header)

    def shape(self, name: str) -> tuple:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_NP_FROM_ST[self.header[name]["dtype"]])

    def read(self, name: str) -> np.ndarray:
        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = np.dtype(_NP_FROM_ST[info["dtype"]]).newbyteorder("<")
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + begin)
            buf = fh.read(end - begin)
        return np.frombuffer(buf, dtype=dtype).reshape(info["shape"]).astype(dtype.newbyteorder("="), copy=True)

    def check_against(self, expected: dict) -> None:
        """``expected``: name -> (shape, dtype name). Missing or mis-shaped tensors are errors."""
        missing = sorted(set(expected) - set(self.header))
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise BlueLowerError(f"{self.path}: missing weight(s) {', '.join(missing[:3])}{more}")
        for name, (shape, _dtype) in expected.items():
            if self.shape(name) != tuple(shape):
                raise BlueLowerError(
                    f"{self.path}: weight '{name}' has shape {list(self.shape(name))}, the model expects {list(shape)}"
                )

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
