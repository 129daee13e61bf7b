"""Fuzzing in every test run (issue 16; docs/native-runtime.md, "Fuzzing"), each for a fixed
small budget:

* the native readers: ``runtime_stubs/native/fuzz_loaders.cc`` (JSON parser, safetensors
  index, ``.npy`` + image preprocessing, tokenizer.json, SHA-256) built with clang's
  libFuzzer + ASan + UBSan (cached by source hash) and run for ``BLUELOWER_FUZZ_SECONDS``
  (default 20) from a seed corpus written here; skipped without ``clang++``;
* the Python readers: ``read_manifest``, the safetensors header (``SafetensorsFile``), model
  configs (``load_config``) and GGUF headers (``GGUFCheckpoint``), each driven by a
  deterministic seeded mutation loop (byte flips, inserts, deletions, truncations, splices of
  JSON tokens, and structure-aware replacement of JSON values) for ``BLUELOWER_FUZZ_PY_SECONDS``
  (default 3) per reader. A reader may accept an input or refuse it with a one-line
  ``BlueLowerError``; anything else (another exception, a multi-line message) is a failure.

A failure saves its reproducer in ``$BLUELOWER_FUZZ_ARTIFACTS`` (default: the test's
``tmp_path``) and names it in the assertion message (libFuzzer's ``crash-<sha1>`` files; the
Python loop's ``<reader>-<iteration>.bin``). Replay a native one with
``fuzz_loaders FILE``, a Python one with ``BLUELOWER_FUZZ_REPLAY=FILE pytest tests/test_fuzz.py -k <reader>``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import time

import numpy as np
import pytest

from bluelower.errors import BlueLowerError

NATIVE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bluelower", "runtime_stubs", "native")
FUZZ_SOURCES = ("fuzz_loaders.cc", "json.cc", "loaders.cc", "image.cc", "util.cc", "sha256.cc", "tokenizer.cc")
FUZZ_FLAGS = ("-std=c++17", "-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined")


def _artifacts(tmp_path) -> str:
    d = os.environ.get("BLUELOWER_FUZZ_ARTIFACTS") or str(tmp_path / "fuzz-artifacts")
    os.makedirs(d, exist_ok=True)
    return d


# ------------------------------------------------------------------ seeds (shared by both sides)

TOKENIZER = {
    "version": "1.0",
    "added_tokens": [{"id": 0, "content": "<s>", "special": True, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False}],
    "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": None,
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": {"<s>": 0, "H": 1, "e": 2, "l": 3, "o": 4, "He": 5, "ll": 6, "Hell": 7, "\u0120": 8, "w": 9},
              "merges": ["H e", "l l", "He ll"]},
}
SP_TOKENIZER = {  # SentencePiece-style: Metaspace, byte fallback, <unk>
    **TOKENIZER,
    "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": None,
    "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                 {"type": "ByteFallback"}, {"type": "Fuse"},
                                                 {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {**TOKENIZER["model"], "unk_token": "<unk>", "byte_fallback": True, "fuse_unk": True,
              "vocab": {"<unk>": 0, "<0x41>": 1, "\u2581H": 2, "e": 3, "l": 4, "o": 5, "\u2581": 6}, "merges": ["e l"]},
}


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


MANIFEST = {
    "format": "bluelower-bundle", "format_version": 1, "soc": "host", "quant": "fp32",
    "runtime": {"kv_capacity": 64, "prefill_chunk": 16, "image_batch": 1, "eos_token_id": 2, "stop_token_ids": [],
                "image_size": 32, "image_tokens_per_patch": 4, "hidden_size": 8, "vocab_size": 16, "max_patches": 9,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    "kv_cache": {"shape": [1, 2, 1, 64, 8], "dtype": "float32", "bytes": 4096, "bytes_per_token": 64},
    "functions": {f: {"inputs": [{"name": "x", "shape": [16], "dtype": "int64"}], "params": ["w"],
                      "outputs": [{"shape": [16, 8], "dtype": "float32"}]} for f in ("embed", "prefill", "decode")},
    "target": {"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu"},
    "files": {"model.so": "0" * 64, "params.safetensors": "1" * 64},
}


def _native_seeds() -> dict:
    st = _safetensors({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                       "b": {"dtype": "I8", "shape": [3], "data_offsets": [16, 19]}, "__metadata__": {"k": "v"}},
                      bytes(19))
    return {
        "manifest": b"\0" + json.dumps(MANIFEST).encode(),
        "json-escapes": b"\0" + '{"a": "\\u00e9\\ud83d\\ude00\\n", "b": [1, -2.5e3, true, null], "c": "h\u00e9llo \u4e16 \U0001f600"}'.encode(),
        "safetensors": b"\1" + st,
        "npy-u8": b"\2" + _npy(np.arange(7 * 5 * 3, dtype=np.uint8).reshape(7, 5, 3)),
        "npy-f32": b"\2" + _npy(np.full((4, 9, 3), 0.25, np.float32)),
        "npy-fortran": b"\2" + _npy(np.asfortranarray(np.arange(60, dtype=np.uint8).reshape(4, 5, 3))),
        "tokenizer-bpe": b"\3" + json.dumps(TOKENIZER).encode(),
        "tokenizer-sp": b"\3" + json.dumps(SP_TOKENIZER).encode(),
        "sha": b"\4abc",
    }


# ------------------------------------------------------------------ native: libFuzzer


def _fuzz_binary() -> str:
    clang = shutil.which("clang++")
    if clang is None:
        pytest.skip("clang++ not installed (apt-get install -y clang; scripts/install.sh does as root)")
    from bluelower.cache import cache_dir

    h = hashlib.sha256(" ".join(FUZZ_FLAGS).encode())
    h.update(subprocess.run([clang, "--version"], capture_output=True, text=True).stdout.encode())
    for f in sorted(os.listdir(NATIVE)):
        if f.endswith((".cc", ".h")):
            h.update(f.encode() + open(os.path.join(NATIVE, f), "rb").read())
    out_dir = cache_dir("fuzz", h.hexdigest()[:20])
    binary = os.path.join(out_dir, "fuzz_loaders")
    if not os.path.isfile(binary):
        tmp = binary + f".tmp-{os.getpid()}"
        proc = subprocess.run([clang, *FUZZ_FLAGS, *FUZZ_SOURCES, "-o", tmp], cwd=NATIVE, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        os.replace(tmp, binary)
    return binary


def test_native_readers_under_libfuzzer(tmp_path):
    binary = _fuzz_binary()
    corpus, seeds = tmp_path / "corpus", tmp_path / "seeds"
    corpus.mkdir()
    seeds.mkdir()
    for name, data in _native_seeds().items():
        (seeds / name).write_bytes(data)
    art = _artifacts(tmp_path)
    seconds = int(os.environ.get("BLUELOWER_FUZZ_SECONDS", "20"))
    # one allocation above 512 MB from a <= 16 KB input is a bug (-malloc_limit_mb); the process's
    # RSS grows with ASan's quarantine and allocator caches over a run, not with the input
    # (an "oom" of the empty input at 2 GB, live heap 25 MB), so its own limit is looser
    cmd = [binary, f"-max_total_time={seconds}", "-seed=1", "-rss_limit_mb=6144", "-malloc_limit_mb=512",
           "-max_len=16384", "-timeout=10", f"-artifact_prefix={art}/", "-print_final_stats=1", str(corpus), str(seeds)]
    env = dict(os.environ, ASAN_OPTIONS="quarantine_size_mb=64:" + os.environ.get("ASAN_OPTIONS", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 4 + 120, env=env)
    crashes = sorted(f for f in os.listdir(art) if f.startswith(("crash-", "leak-", "timeout-", "oom-", "slow-unit-")))
    tail = "\n".join(proc.stderr.splitlines()[-40:])
    assert proc.returncode == 0 and not crashes, (f"libFuzzer found a failing input: {[os.path.join(art, c) for c in crashes]} "
                                                  f"(replay: {binary} FILE)\n{tail}")
    runs = [ln for ln in proc.stderr.splitlines() if "stat::number_of_executed_units" in ln]
    assert runs and int(runs[0].split()[-1]) > 1000, tail


# ------------------------------------------------------------------ Python: seeded mutation

JSON_TOKENS = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"null", b"true", b"-1", b"0", b"1e999", b"-0.0", b"NaN",
               b"Infinity", b"18446744073709551616", b"100000000000000000000", b"\\u0000", b"\\ud800", b"\xff", b"\xc0\x80",
               b"\xed\xa0\x80", b"[" * 200, b"{\"a\":" * 50]
INTERESTING = [0, -1, 1, 2**31, 2**31 - 1, 2**63, -2**63, 2**64, 10**20, 1e20, -1e300, 0.5, float("nan"), float("inf"),
               "", "x", "\u00e9", "..", "/etc/passwd", None, True, False, [], {}, [1, 2], {"a": 1}]


def _random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if r < 0.5 or depth > 3:
        return rng.choice(INTERESTING)
    if r < 0.75:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if r < 0.9:
        return {rng.choice(["a", "dtype", "shape", "data_offsets", "format", "vocab_size"]): _random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    v = 0
    for _ in range(rng.choice([70, 1000, 20000])):  # deep nesting
        v = [v]
    return v


def _mutate_json_value(rng: random.Random, doc):
    """A copy of ``doc`` with one value somewhere replaced, removed or added."""
    try:
        doc = json.loads(json.dumps(doc))
    except (RecursionError, ValueError):  # an earlier mutation nested it very deep
        return _random_value(rng)
    path, node = [], doc
    while isinstance(node, (dict, list)) and node and rng.random() < 0.75:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
    if not path:
        return _random_value(rng)
    parent, key = path[-1]
    op = rng.random()
    if op < 0.7:
        parent[key] = _random_value(rng)
    elif op < 0.85:
        del parent[key]
    elif isinstance(parent, dict):
        parent[rng.choice(["extra", "format_version", "__metadata__", key])] = _random_value(rng)
    else:
        parent.insert(key, _random_value(rng))
    return doc


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(len(b) + 1) if b else 0
        if op < 0.3 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op < 0.5:
            b[i:i] = rng.choice(JSON_TOKENS)
        elif op < 0.65 and b:
            del b[i:i + rng.randint(1, 16)]
        elif op < 0.75:
            b = b[:i]
        elif op < 0.9 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        else:
            j = rng.randrange(len(b) + 1) if b else 0
            b[i:i] = b[j:j + rng.randint(1, 32)]
    return bytes(b)


def _json_dumps(doc) -> bytes:
    try:
        return json.dumps(doc).encode()
    except (ValueError, RecursionError):
        return b"[" * 30000


def _loop(name: str, seeds: list, to_bytes, check, tmp_path, structured: bool = True) -> int:
    """Mutate ``seeds`` (JSON documents when ``structured``, else bytes) with a seeded RNG for
    the budget; ``check(data)`` must return or raise a one-line BlueLowerError."""
    replay = os.environ.get("BLUELOWER_FUZZ_REPLAY")
    if replay:
        inputs = iter([open(replay, "rb").read()])
    rng = random.Random(f"bluelower-fuzz-{name}")
    budget = float(os.environ.get("BLUELOWER_FUZZ_PY_SECONDS", "3"))
    deadline, n = time.monotonic() + budget, 0
    while time.monotonic() < deadline or n < 50:
        if replay:
            data = next(inputs, None)
            if data is None:
                break
        else:
            seed = rng.choice(seeds)
            if structured and rng.random() < 0.5:
                doc = seed
                for _ in range(rng.randint(1, 3)):
                    doc = _mutate_json_value(rng, doc)
                data = to_bytes(doc)
            else:
                data = _mutate_bytes(rng, to_bytes(seed) if structured else seed)
        n += 1
        try:
            check(data)
        except BlueLowerError as exc:
            if "\n" in str(exc) or not str(exc):
                _save_failure(name, n, data, tmp_path, f"a BlueLowerError that is not one line: {exc!r}")
        except Exception as exc:  # noqa: BLE001 (anything else is what the fuzzer is looking for)
            _save_failure(name, n, data, tmp_path, f"{type(exc).__name__}: {str(exc)[:300]}")
    return n


def _save_failure(name, n, data, tmp_path, what):
    path = os.path.join(_artifacts(tmp_path), f"{name}-{n}.bin")
    with open(path, "wb") as fh:
        fh.write(data)
    pytest.fail(f"{name}: input {n} ({len(data)} bytes, saved as {path}) raised {what}; replay with "
                f"BLUELOWER_FUZZ_REPLAY={path} pytest tests/test_fuzz.py -k {name}", pytrace=False)


def test_python_manifest_reader(tmp_path):
    from bluelower.lowering.artifacts.bundle import read_manifest

    build = tmp_path / "build"
    build.mkdir()

    def check(data: bytes) -> None:
        (build / "manifest.json").write_bytes(data)
        read_manifest(str(build))

    assert _loop("manifest", [MANIFEST], _json_dumps, check, tmp_path) >= 50


def test_python_safetensors_header(tmp_path):
    from bluelower.lowering.frontend.weights import SafetensorsFile

    path = tmp_path / "w.safetensors"
    data = bytes(range(64)) * 2
    seeds = [{"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
              "i": {"dtype": "I64", "shape": [4], "data_offsets": [32, 64]},
              "h": {"dtype": "F16", "shape": [3, 2], "data_offsets": [64, 76]}, "__metadata__": {"format": "pt"}}]

    def check(raw: bytes) -> None:
        path.write_bytes(raw)
        f = SafetensorsFile(str(path))
        for name in list(f.tensors)[:4]:
            f.read(name)

    def to_bytes(header) -> bytes:
        raw = _json_dumps(header)
        return struct.pack("<Q", len(raw)) + raw + data

    assert _loop("safetensors", seeds, to_bytes, check, tmp_path) >= 50
    # the 8-byte length itself, mutated
    assert _loop("safetensors-raw", [to_bytes(seeds[0])], lambda b: b, check, tmp_path, structured=False) >= 50


def test_python_config_reader(tmp_path):
    from bluelower.lowering.models import load_config
    from bluelower.lowering.models.registry import builtin_configs

    shipped = builtin_configs()["tiny"]
    tiny = json.load(open(os.path.join(shipped.config_dir, "tiny.json")))
    path = tmp_path / "cfg.json"

    def check(data: bytes) -> None:
        path.write_bytes(data)
        load_config(str(path))

    assert _loop("config", [tiny], _json_dumps, check, tmp_path) >= 50


def _tiny_gguf(path: str) -> bytes:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.embedding_length", 8)
    w.add_uint32("llama.attention.head_count", 2)
    w.add_uint32("llama.attention.head_count_kv", 1)
    w.add_uint32("llama.block_count", 1)
    w.add_uint32("llama.feed_forward_length", 16)
    w.add_uint32("llama.context_length", 64)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return open(path, "rb").read()


def test_python_gguf_header(tmp_path):
    from bluelower.lowering.frontend.checkpoints import GGUFCheckpoint

    seed = _tiny_gguf(str(tmp_path / "seed.gguf"))
    path = tmp_path / "m.gguf"

    def check(data: bytes) -> None:
        path.write_bytes(data)
        ck = GGUFCheckpoint(str(path))
        ck.close()

    def mutate_header(data: bytes) -> bytes:
        return data

    # bytes-level only (the header is binary); most of the file is the header here
    assert _loop("gguf", [seed], mutate_header, check, tmp_path, structured=False) >= 50
