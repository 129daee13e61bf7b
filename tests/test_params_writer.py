"""params.safetensors is written with tensors produced in threads: the file is byte-identical
for any thread count, and each quantized source weight is converted once."""

import hashlib
import threading

import numpy as np

from bluelower.lowering.kernels.quant import quantize_int4_groupwise
from bluelower.lowering.quant.params import ParamTransform, param_producer
from bluelower.lowering.frontend.weights import WeightSource, random_weight, write_safetensors


def _write(path, threads):
    sources = {f"w{i}": (64, 96) for i in range(6)}
    transforms, specs = {}, []
    for src, (n, k) in sources.items():
        transforms[f"{src}_packed"] = ParamTransform(src, "int4_groupwise", 0, {"group_size": 32})
        transforms[f"{src}_scales"] = ParamTransform(src, "int4_groupwise", 1, {"group_size": 32})
        packed, scales = quantize_int4_groupwise(random_weight(src, (n, k), 0, 0.02), 32)
        specs += [(f"{src}_packed", packed.shape, "uint8"), (f"{src}_scales", scales.shape, "float16")]
    specs += [(f"norm{i}.weight", (96,), "float32") for i in range(5)]
    reads, lock = [], threading.Lock()

    def read_fp32(name):
        with lock:
            reads.append(name)
        shape = sources.get(name, (96,))
        return random_weight(name, shape, 0, 0.02)

    write_safetensors(path, specs, param_producer(transforms, read_fp32), threads=threads)
    return reads


def test_thread_count_does_not_change_the_file(tmp_path):
    digests = []
    for threads in (1, 2, 5):
        path = str(tmp_path / f"p{threads}.safetensors")
        reads = _write(path, threads)
        assert sorted(reads) == sorted(set(reads)), "a source weight was read (and converted) twice"
        assert len(reads) == 11
        with open(path, "rb") as fh:
            digests.append(hashlib.sha256(fh.read()).hexdigest())
    assert len(set(digests)) == 1
    src = WeightSource(str(tmp_path / "p2.safetensors"))
    packed, scales = quantize_int4_groupwise(random_weight("w3", (64, 96), 0, 0.02), 32)
    assert np.array_equal(src.read("w3_packed"), packed) and np.array_equal(src.read("w3_scales"), scales)
