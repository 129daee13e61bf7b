"""LLM benchmark: bluelower's compiled decoder vs llama.cpp (llama-cpp-python, Q4_0 GGUF
of the same weights) vs PyTorch eager fp32, same machine, one run.

Usage::

    .venv/bin/python benchmarks/llm_bench.py --size 3b            # the whole thing
    .venv/bin/python benchmarks/llm_bench.py --size tiny          # + logits check
    .venv/bin/python benchmarks/llm_bench.py --compile-bench      # compile time/RSS only

What one run does (all large files under ~/.cache/bluelower-bench, never in git):

1. seeded random fp32 safetensors for the decoder-focused config of ``--size``
   (benchmarks/_llm_models.py), streamed tensor by tensor;
2. a Q4_0 GGUF of the same tensors (llama architecture, Q/K rows permuted for
   llama.cpp's RoPE, dummy SPM vocab); on ``tiny`` (or ``--verify``) an F32 GGUF too, and
   llama.cpp's logits are checked against the PyTorch reference;
3. the bluelower build: ``compile_model(CompileRequest(quant=--quant))`` (default ``w4a8kv8``), falling back
   to the best available mode when that one is not implemented (recorded);
4. memory bandwidth (numpy copy of 1 GiB, 1 and 2 threads);
5. ``--repeats`` rounds of  bluelower, llama.cpp (one engine per weight-buffer configuration,
   ``--llamacpp-bufts``), torch  (A B C A B C), each engine in its
   own subprocess (so peak RSS is per engine and at most one big model is resident);
   per round: prefill 128 tokens, decode at context 128, prefill 2048 tokens (16 chunks),
   decode at context ~2048; medians over rounds;
6. results JSON in benchmarks/results/, docs/benchmarks.md and docs/img/benchmarks.png
   regenerated from every results file present.

Threads: 2 for every engine (TVM_NUM_THREADS, torch.set_num_threads, n_threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import _llm_models as M  # noqa: E402

THREADS = 2
ENGINES = ("bluelower", "llamacpp", "torch")
# llama.cpp weight-buffer configurations (``--engines llamacpp`` runs each; the ratios use
# the fastest one that completed every round of a measurement): ``default`` = llama.cpp's own
# choice (on the 2026-12-02 Xeon: AMX, whose batched prefill crashed; a probe decides, see
# probe_default_prefill), ``no-extra`` = plain
# CPU kernels, ``repack`` = Q4_0 matrices pinned to CPU_REPACK (the AVX-512 8x8 kernels)
LLAMA_BUFTS = ("default", "no-extra", "repack")
WORKERS = ("bluelower", "torch") + tuple(f"llamacpp-{b}" for b in LLAMA_BUFTS)
PY = sys.executable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def env_threads() -> dict:
    env = dict(os.environ)
    env.update(TVM_NUM_THREADS=str(THREADS), OMP_NUM_THREADS=str(THREADS), OPENBLAS_NUM_THREADS=str(THREADS),
               MKL_NUM_THREADS=str(THREADS), BLUELOWER_QUIET="1")
    return env


# ======================================================================== workers


class _TorchLike:
    """bluelower CompiledModel / TorchReference behind one interface."""

    def __init__(self, backend, hidden):
        self.b, self.chunk, self.hidden = backend, backend.chunk, hidden

    def reset(self):
        self.b.reset_cache()

    def prefill(self, ids):
        c = self.chunk
        logits = None
        for s in range(0, len(ids), c):
            part = np.zeros(c, np.int64)
            valid = min(c, len(ids) - s)
            part[:valid] = ids[s : s + valid]
            emb = self.b.embed_chunk(part)
            logits = self.b.prefill_chunk(np.ascontiguousarray(emb, dtype=np.float32), s, valid)
        return logits

    def decode(self, tok, pos):
        return self.b.decode_step(int(tok), int(pos))

    fill = prefill  # an untimed fill of the context (see _Llama.fill)


# Matrices that go through GGML_OP_MUL_MAT (token_embd is a GET_ROWS and must stay in the
# plain CPU buffer; norms are F32 vectors).
_MATMUL_WEIGHTS = rb"^(blk\.[0-9]+\.(attn_(q|k|v|output)|ffn_(gate|up|down))|output)\.weight$"
_KEEP = []  # ctypes objects referenced by llama_model_params must outlive the model


def _cpu_extra_bufts() -> dict:
    """Name -> ggml_backend_buffer_type_t of the CPU backend's extra buffer types
    (e.g. {"AMX": .., "CPU_REPACK": ..}), through libggml's registry."""
    import ctypes

    import llama_cpp

    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    g = ctypes.CDLL(os.path.join(libdir, "libggml.so"))
    gb = ctypes.CDLL(os.path.join(libdir, "libggml-base.so"))
    vp = ctypes.c_void_p
    g.ggml_backend_dev_by_type.restype, g.ggml_backend_dev_by_type.argtypes = vp, [ctypes.c_int]
    g.ggml_backend_dev_backend_reg.restype, g.ggml_backend_dev_backend_reg.argtypes = vp, [vp]
    g.ggml_backend_reg_get_proc_address.restype = vp
    g.ggml_backend_reg_get_proc_address.argtypes = [vp, ctypes.c_char_p]
    gb.ggml_backend_buft_name.restype, gb.ggml_backend_buft_name.argtypes = ctypes.c_char_p, [vp]
    dev = g.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    addr = g.ggml_backend_reg_get_proc_address(g.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return {}
    arr = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(addr)(dev)
    out, i = {}, 0
    while arr[i]:
        out[gb.ggml_backend_buft_name(arr[i]).decode()] = arr[i]
        i += 1
    return out


class _Llama:
    """llama-cpp-python behind the _TorchLike interface.

    Weight buffers: llama.cpp 0.3.36's CPU backend puts Q4_0 matrices into its AMX buffer
    type first when the CPU has AMX-INT8 (this Xeon does). Its AMX Q4_0 GEMM (used for
    batches > 1, i.e. prefill) segfaults on these models (tiny: in-features 64/160; mid:
    1024/2816: reproduced with a 200-token ``eval``; 1-token decode survives). So the
    matrices are pinned to ``CPU_REPACK`` (the AVX2/AVX-512 Q4_0 8x8 repacked kernels, what
    llama.cpp uses on CPUs without AMX) via ``tensor_buft_overrides``; if that buffer type
    is not found, extra buffer types are disabled (plain Q4_0). ``self.bufts`` records which.
    ``bufts="default"`` leaves llama.cpp's choice (used for the F32 GGUF: CPU_REPACK has no
    F32 kernels and crashes at load if F32 matrices are pinned to it).
    """

    def __init__(self, path, n_ctx, kv_f32=False, bufts="repack"):
        import ctypes

        import llama_cpp
        import llama_cpp.llama_cpp as C
        from llama_cpp import Llama

        self.path, self.n_ctx = path, n_ctx
        orig = C.llama_model_default_params
        extra = _cpu_extra_bufts() if bufts == "repack" else {}
        if bufts == "repack" and "CPU_REPACK" not in extra:
            bufts = "no-extra"
        self.bufts = bufts

        def params():
            p = orig()
            if bufts == "repack":
                class Ov(ctypes.Structure):
                    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

                ovs = (Ov * 2)(Ov(_MATMUL_WEIGHTS, extra["CPU_REPACK"]), Ov(None, None))
                _KEEP.append(ovs)
                p.tensor_buft_overrides = ctypes.cast(ovs, ctypes.c_void_p)
            elif bufts == "no-extra":
                p.use_extra_bufts = False
            return p

        kw = {}
        if kv_f32:
            kw.update(type_k=C.GGML_TYPE_F32, type_v=C.GGML_TYPE_F32)
        C.llama_model_default_params = params
        try:
            self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=THREADS, n_threads_batch=THREADS,
                             logits_all=False, verbose=False, seed=0, **kw)
        finally:
            C.llama_model_default_params = orig

    #: set when probe_default_prefill found this configuration's batched prefill crashing
    batched_prefill_crashes = False

    def fill(self, ids):
        """The KV cache holding ``ids``. For a configuration whose batched prefill crashes
        (``default`` on a CPU with AMX: llama.cpp's AMX Q4_0 GEMM): a second copy of the model
        with plain CPU kernels (``no-extra``) evaluates the prompt in batches and its state
        (KV cache, token count) is loaded into this context, so this configuration's decode
        runs at the filled context without a 2048-step token-by-token fill. Returns the last
        logits."""
        if not self.batched_prefill_crashes:
            return self.prefill(ids)
        if getattr(self, "_filler", None) is None:
            self._filler = _Llama(self.path, self.n_ctx, bufts="no-extra")
        self._filler.reset()
        logits = self._filler.prefill(ids)
        self.llm.load_state(self._filler.llm.save_state())
        return logits

    def reset(self):
        self.llm.reset()
        # also drop the KV cache contents so nothing is reused between measurements
        try:
            self.llm._ctx.kv_cache_clear()
        except Exception:
            pass

    def _last_logits(self):
        # with logits_all=False, llama-cpp-python 0.3.36 leaves Llama.scores at zero: read
        # the last row from the context directly
        import llama_cpp

        p = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(p, shape=(self.llm.n_vocab(),)).copy()[None]

    def prefill(self, ids):
        self.llm.eval([int(i) for i in ids])
        return self._last_logits()

    def decode(self, tok, pos):
        self.llm.eval([int(tok)])
        return self._last_logits()


def _open_engine(engine, args, cfg):
    if engine == "bluelower":
        from bluelower.runtime_stubs.generate import CompiledModel

        return _TorchLike(CompiledModel(args.build_dir, verify=False), cfg.decoder.hidden_size)
    if engine == "torch":
        import torch

        torch.set_num_threads(THREADS)
        from bluelower.runtime_stubs.generate import TorchReference

        return _TorchLike(TorchReference(cfg, args.weights), cfg.decoder.hidden_size)
    if engine.startswith("llamacpp-"):
        eng = _Llama(args.gguf, n_ctx=args.long + args.decode_tokens + 64, bufts=engine.split("-", 1)[1])
        eng.batched_prefill_crashes = bool(args.decode_only)
        return eng
    raise ValueError(engine)


def worker(args) -> None:
    """One engine, one round: print ``RESULT {json}`` on stdout."""
    from bluelower.lowering.models import load_config

    cfg = load_config(M.config_path(args.size))
    V = cfg.decoder.vocab_size
    rng = np.random.default_rng(1234)
    prompt = rng.integers(3, V, size=args.long)  # same ids for every engine
    t0 = time.perf_counter()
    eng = _open_engine(args.worker, args, cfg)
    load_s = time.perf_counter() - t0
    # warm-up: one chunk + one decode step
    eng.reset()
    eng.fill(prompt[: args.chunk])
    eng.decode(5, args.chunk)
    if not args.serve:
        return one_round(args, cfg, eng, prompt, load_s, args.skip, args.profile)
    print("READY", flush=True)
    for line in sys.stdin:  # one measurement round per line: "<skip list> <profile 0/1>"
        if not line.strip() or line.strip() == "QUIT":
            break
        parts = line.split()
        one_round(args, cfg, eng, prompt, load_s, "" if parts[0] == "-" else parts[0], parts[1] == "1")


def decode_only(eng) -> bool:
    """A llama.cpp configuration whose batched prefill crashed in probe_default_prefill
    (its default buffers on an AMX CPU): measured for decode only."""
    return isinstance(eng, _Llama) and eng.batched_prefill_crashes


def probe_default_prefill(gguf: str, n: int = 128) -> str | None:
    """Whether llama.cpp's *default* weight buffers run a batched prefill of ``n`` tokens of
    ``gguf`` on this machine: None if they do, else why not (the probe process's exit code:
    on the 2026-12-02 Xeon, llama.cpp 0.3.36's AMX Q4_0 GEMM died with SIGSEGV/SIGILL). Run
    in its own process, since the failure kills it."""
    code = ("import sys, llm_bench as B; e = B._Llama(sys.argv[1], n_ctx=%d, bufts='default'); e.reset(); "
            "e.prefill(list(range(1, %d)))" % (n + 16, n + 1))
    try:
        p = subprocess.run([PY, "-c", code, gguf], cwd=HERE, capture_output=True, text=True, env=env_threads(),
                           timeout=900)
    except subprocess.TimeoutExpired:
        return f"a {n}-token batched prefill did not finish in 900 s"
    if p.returncode == 0:
        return None
    return f"its {n}-token batched prefill died (exit code {p.returncode})"


def one_round(args, cfg, eng, prompt, load_s, skip_list, profile) -> None:
    V = cfg.decoder.vocab_size
    out = {"engine": args.worker, "skipped": {}, "load_s": load_s}
    llama = isinstance(eng, _Llama)
    if llama:
        out["weight_buffers"] = eng.bufts
    budget = args.max_seconds

    def timed(fn):
        t = time.perf_counter()
        r = fn()
        return time.perf_counter() - t, r

    def decode_run(start_pos, first_tok):
        n = args.decode_tokens
        t1, logits = timed(lambda: eng.decode(first_tok, start_pos))
        if t1 * n > budget:
            n = max(1, int(budget / max(t1, 1e-9)))
            out["skipped"][f"decode_tokens_at_{start_pos}"] = f"only {n} token(s): {t1:.1f} s/token"
        times = [t1]
        tok = int(np.argmax(logits[0]))
        for j in range(1, n):
            dt, logits = timed(lambda: eng.decode(tok, start_pos + j))
            times.append(dt)
            tok = int(np.argmax(logits[0]))
        return len(times) / sum(times)

    skip = set(skip_list.split(",")) if skip_list else set()
    if decode_only(eng):
        why = "not measured: its batched prefill crashed in the probe; context filled by the no-extra copy"
        for m in ("prefill128", "prefill2048"):
            if m not in skip:
                out["skipped"][m] = why
                skip.add(m)
    # prefill 128 + decode at context 128
    eng.reset()
    if "prefill128" not in skip:
        dt, logits = timed(lambda: eng.prefill(prompt[: args.chunk]))
        out["prefill128_tok_s"] = args.chunk / dt
        out["prefill128_s"] = dt
    else:
        logits = eng.fill(prompt[: args.chunk]) if "decode128" not in skip else None
    if "decode128" not in skip:
        out["decode128_tok_s"] = decode_run(args.chunk, int(np.argmax(logits[0])))
    # prefill 2048 + decode at context ~2048
    eng.reset()
    est = out.get("prefill128_s", 0) * args.long / args.chunk
    if "prefill2048" in skip or est > budget:
        out["skipped"].setdefault("prefill2048", f"estimated {est:.0f} s > budget {budget:.0f} s" if est > budget else "--skip")
        ctx_logits = np.zeros((1, V), np.float32)
        if llama and decode_only(eng):
            ctx_logits = eng.fill(prompt)
        elif llama:  # llama.cpp's cost depends on the filled context: fill it
            ctx_logits = eng.prefill(prompt[: args.long - args.decode_tokens])
    else:
        dt, ctx_logits = timed(lambda: eng.prefill(prompt))
        out["prefill2048_tok_s"] = args.long / dt
        out["prefill2048_s"] = dt
    if "decode2048" not in skip:
        # bluelower/torch have a fixed 2048-row cache attended in full (masked): positions
        # 2048-n .. 2047 cost the same as any; llama.cpp continues after the 2048-token prompt
        pos = args.long if llama else args.long - args.decode_tokens
        if llama and "prefill2048" in out["skipped"] and not decode_only(eng):
            pos = args.long - args.decode_tokens
        out["decode2048_tok_s"] = decode_run(pos, int(np.argmax(ctx_logits[0])))
    if profile and args.worker == "bluelower":
        try:
            out["profile"] = profile_bluelower(args, cfg)
        except Exception as exc:  # noqa: BLE001
            out["profile"] = {"error": repr(exc)[-500:]}
    out["peak_rss_mb"] = peak_rss_mb()
    out["loadavg"] = loadavg()
    print("RESULT " + json.dumps(out), flush=True)


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would inherit the parent's high-water mark across
    fork+exec: the orchestrator's 2 GiB bandwidth buffers)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profile_bluelower(args, cfg) -> dict:
    """Per-kernel wall time of one decode step and one prefill chunk (the Relax VM's
    instrument hook around every call; TVM 0.27's VM has no built-in profiler): top kernels."""
    import tvm
    import tvm_ffi
    from tvm import relax

    from bluelower.runtime_stubs.generate import CompiledModel
    from bluelower.lowering.artifacts.bundle import LIBRARY

    cm = CompiledModel(args.build_dir, verify=False)
    vm = relax.VirtualMachine(tvm.runtime.load_module(os.path.join(args.build_dir, LIBRARY)), cm.dev)
    cm.reset_cache()
    rows, counts, start = {}, {}, [0.0]

    def instrument(func, symbol, before_run, ret_value, *call_args):
        if before_run:
            start[0] = time.perf_counter()
        else:
            rows[symbol] = rows.get(symbol, 0.0) + time.perf_counter() - start[0]
            counts[symbol] = counts.get(symbol, 0) + 1
        return 0

    res = {}
    calls = {
        "decode": [np.array([5], np.int64), cm.kv, np.array([args.chunk], np.int64)],
        "prefill": [np.zeros((args.chunk, cfg.decoder.hidden_size), np.float32), cm.kv,
                    np.array([0], np.int64), np.array([args.chunk], np.int64)],
    }
    for name, inputs in calls.items():
        inputs = [tvm.runtime.tensor(x, cm.dev) if isinstance(x, np.ndarray) else x for x in inputs]
        vm[name](*inputs, *cm.params[name])  # warm-up, uninstrumented
        vm.set_instrument(tvm_ffi.convert(instrument))
        rows.clear()
        counts.clear()
        t0 = time.perf_counter()
        vm[name](*inputs, *cm.params[name])
        wall = time.perf_counter() - t0
        vm.set_instrument(tvm_ffi.convert(lambda *a: 0))
        tot = sum(rows.values()) or 1e-9
        top = sorted(rows.items(), key=lambda kv: -kv[1])[:10]
        res[name] = {"total_ms": round(tot * 1000, 2), "wall_ms": round(wall * 1000, 2),
                     "top": [[k, round(v * 1000, 2), round(100 * v / tot, 1), counts[k]] for k, v in top]}
    return res


def verify(args) -> None:
    """llama.cpp (F32 and Q4_0 GGUF) logits vs the PyTorch reference on one prompt."""
    import torch

    torch.set_num_threads(THREADS)
    from bluelower.runtime_stubs.generate import TorchReference
    from bluelower.lowering.models import load_config

    cfg = load_config(M.config_path(args.size))
    ref = _TorchLike(TorchReference(cfg, args.weights), cfg.decoder.hidden_size)
    ids = np.random.default_rng(7).integers(3, cfg.decoder.vocab_size, size=200)
    ref.reset()
    want = ref.prefill(ids)[0]
    want_dec = ref.decode(11, len(ids))[0]
    out = {}
    for q, path in (("F32", args.gguf_f32), ("Q4_0", args.gguf)):
        if not path:
            continue
        # F32 GGUF: F32 KV cache too (the default f16 cache alone adds ~1e-3 relative error),
        # so the only differences left are float32 summation order
        # (CPU_REPACK only takes quantized matrices: the F32 file keeps the default buffers,
        # where F32 weights never go to AMX)
        eng = _Llama(path, 512, kv_f32=(q == "F32"), bufts="repack" if q != "F32" else "default")
        eng.reset()
        got = eng.prefill(ids)[0]
        got_dec = eng.decode(11, len(ids))[0]
        cos = float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)))
        out[q] = {
            "prefill_max_abs_diff": float(np.abs(got - want).max()),
            "decode_max_abs_diff": float(np.abs(got_dec - want_dec).max()),
            "logit_scale": float(np.abs(want).max()),
            "cosine": cos,
            "argmax_equal": bool(np.argmax(got) == np.argmax(want)) and bool(np.argmax(got_dec) == np.argmax(want_dec)),
            "kv_cache": "f32" if q == "F32" else "f16",
            "weight_buffers": eng.bufts,
        }
    print("RESULT " + json.dumps(out), flush=True)


# =================================================================== orchestrator


def run_worker(argv: list[str], timeout: float) -> dict:
    cmd = [PY, os.path.abspath(__file__)] + argv
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env_threads(), timeout=timeout)
    dt = time.perf_counter() - t
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["wall_s"] = dt
            return r
    raise RuntimeError(f"worker {' '.join(argv)} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")


class Server:
    """A persistent worker process: one measurement round per request line."""

    def __init__(self, argv):
        self.p = subprocess.Popen([PY, os.path.abspath(__file__)] + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(os.path.join(tempfile.gettempdir(), f"llm_bench-{argv[1]}.err"), "w"), text=True, env=env_threads())
        line = self.p.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"worker {argv} did not start (rc {self.p.poll()})")

    def round(self, skip, profile):
        t = time.perf_counter()
        self.p.stdin.write(f"{skip or '-'} {1 if profile else 0}\n")
        self.p.stdin.flush()
        for line in self.p.stdout:
            if line.startswith("RESULT "):
                r = json.loads(line[7:])
                r["wall_s"] = time.perf_counter() - t
                return r
        raise RuntimeError(f"worker died (rc {self.p.poll()})")

    def close(self):
        try:
            self.p.stdin.write("QUIT\n")
            self.p.stdin.close()
            self.p.wait(timeout=60)
        except Exception:  # noqa: BLE001
            self.p.kill()


def mem_bandwidth() -> dict:
    """numpy copy of 1 GiB float32 (read + write counted), 1 thread and 2 threads (halves)."""
    n = (1 << 30) // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    res = {}
    for nt in (1, THREADS):
        times = []
        bounds = [(i * n // nt, (i + 1) * n // nt) for i in range(nt)]
        for _ in range(3):
            t = time.perf_counter()
            if nt == 1:
                np.copyto(dst, src)
            else:
                ths = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
                [x.start() for x in ths]
                [x.join() for x in ths]
            times.append(time.perf_counter() - t)
        res[f"copy_{nt}t_GBps"] = 2 * src.nbytes / min(times) / 1e9
        res[f"copy_{nt}t_median_GBps"] = 2 * src.nbytes / statistics.median(times) / 1e9
    del src, dst
    res["best_GBps"] = max(res[f"copy_{nt}t_GBps"] for nt in (1, THREADS))
    return res


def timed_child(cmd: list[str], env=None, timeout=None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds, max RSS (MB), rc, tail of stderr."""
    full = ["/usr/bin/time", "-v"] + cmd
    t = time.perf_counter()
    try:
        p = subprocess.run(full, capture_output=True, text=True, env=env, timeout=timeout)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as exc:
        return {"cmd": " ".join(cmd), "rc": None, "wall_s": time.perf_counter() - t, "error": f"timeout {timeout} s",
                "stderr_tail": (exc.stderr or b"")[-800:].decode(errors="replace") if isinstance(exc.stderr, bytes) else ""}
    dt = time.perf_counter() - t
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", err))
    # bluelower's own progress lines: seconds per stage (import, passes, TVM build, params)
    stages = {}
    for line in err.splitlines():
        g = re.match(r"^(import|TVM build|cross-build runtime|bundle): ([\d.]+) s$", line.strip())
        g = g or re.match(r"^(compile passes|write params|import \(\w+\)): done \(.*?([\d.]+) s\)$", line.strip())
        if g:
            stages[g.group(1)] = float(g.group(2))
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(dt, 1), "max_rss_mb": int(m.group(1)) / 1024 if m else None,
            "cpu_s": round(cpu, 1), "stages_s": stages,
            "stderr_tail": "" if rc == 0 else err.split("\tCommand being timed")[0][-1500:], "loadavg_after": loadavg()}


def compile_build(size: str, weights: str, quant_wanted: str) -> dict:
    """Compile the bench config (quant fallback), timed in a subprocess."""
    from bluelower.lowering.quant.modes import QUANT_MODES

    modes = list(QUANT_MODES)
    quant = quant_wanted if quant_wanted in modes else ("w4a16" if "w4a16" in modes else "fp32")
    soc = M.host_soc_path()
    info = {"quant_requested": quant_wanted, "quant_used": quant, "quant_modes_available": modes,
            "soc": os.path.basename(soc)}
    # keyed by the weights file and the compiler's sources: a cached build of other weights
    # or of an older bluelower is never measured
    from bluelower.reports.memory import sources_digest

    tag = f"{os.path.basename(weights).removesuffix('.safetensors')}-{sources_digest()[:12]}"
    out = os.path.join(M.size_dir(size), f"build-{quant}-{os.path.basename(soc).removesuffix('.toml')}-{tag}")
    info["build_dir"] = out
    if os.path.isfile(os.path.join(out, "manifest.json")):
        info["compile"] = "cached"
        return info
    code = ("import sys; from bluelower.lowering.artifacts.compile import compile_model, CompileRequest; "
            f"compile_model(CompileRequest(model={M.config_path(size)!r}, weights={weights!r}, quant={quant!r}, "
            f"soc={soc!r}, out_dir={out!r}))")
    log(f"[compile] {size} quant={quant}")
    info["compile"] = timed_child([PY, "-c", code], env=env_threads())
    if info["compile"]["rc"] != 0:
        raise RuntimeError(f"compile failed: {info['compile']}")
    return info


def busy_processes(min_cpu: float = 20.0) -> list[str]:
    """Other processes using CPU right now (ps %CPU = lifetime average), to record contention."""
    try:
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    out = []
    me = {os.getpid()}
    for line in ps.splitlines()[1:]:
        parts = line.split(None, 3)
        if len(parts) == 4 and float(parts[1]) >= min_cpu and int(parts[0]) not in me and "llm_bench" not in parts[3]:
            out.append(f"pid {parts[0]} {parts[1]}% CPU, up {parts[2]}: {parts[3][:120]}")
    return out[:5]


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "threads_used": THREADS}
    try:
        ls = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache", "Flags"):
            m = re.search(rf"^{re.escape(key)}:\s*(.*)$", ls, re.M)
            if m:
                v = m.group(1).strip()
                if key == "Flags":
                    v = " ".join(f for f in v.split() if f.startswith(("avx512f", "avx2", "avx512_vnni", "fma")))
                info[key] = v
    except OSError:
        pass
    info["mem_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    vers = {}
    from importlib import metadata

    for mod, dist in (("tvm", "apache-tvm"), ("torch", "torch"), ("llama_cpp", "llama-cpp-python"), ("gguf", "gguf"),
                      ("numpy", "numpy")):
        try:
            vers[mod] = metadata.version(dist)
        except Exception as exc:  # noqa: BLE001
            vers[mod] = f"unavailable ({type(exc).__name__})"
    info["versions"] = vers
    return info


def stored_decode_bytes(build_dir: str) -> int | None:
    """The weight bytes one decode call of the build reads, as its manifest states them (the
    recipe's stored formats; the token table counts one row); None for a build without it."""
    try:
        with open(os.path.join(build_dir, "manifest.json"), encoding="utf-8") as fh:
            return int(json.load(fh)["functions"]["decode"]["weights_bytes_per_call"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def main_bench(args) -> dict:
    from bluelower.lowering.models import load_config

    t_start = time.time()
    cfg = load_config(M.config_path(args.size))
    res = {"size": args.size, "config": cfg.decoder.__dict__, "runtime": cfg.runtime.__dict__,
           "command": " ".join([os.path.relpath(PY, ROOT) if PY.startswith(ROOT + os.sep) else os.path.basename(PY)] +
                               [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": machine_info(), "loadavg_start": loadavg(), "notes": [],
           "other_processes_start": busy_processes()}
    cpu0 = cpu_times()
    engines = []
    for e in (x for x in args.engines.split(",") if x):
        engines += [f"llamacpp-{b}" for b in args.llamacpp_bufts.split(",") if b] if e == "llamacpp" else [e]
    weights = M.weights_path(args.size, args.seed, log)
    llama_engines = [e for e in engines if e.startswith("llamacpp-")]
    gguf = M.gguf_path(args.size, "Q4_0", args.seed, log) if llama_engines else None
    default_crash = None
    if "llamacpp-default" in engines:  # does llama.cpp's own choice of buffers run a batched prefill here?
        default_crash = probe_default_prefill(gguf)
        res["llamacpp_default_prefill_probe"] = default_crash or "ok"
        res["llamacpp_extra_bufts"] = sorted(_cpu_extra_bufts())  # what "default" may put matrices in
        log(f"[probe] llama.cpp default buffers, batched prefill: {default_crash or 'ok'}")
    if "bluelower" in engines:
        res["bluelower_build"] = compile_build(args.size, weights, args.quant)
        if res["bluelower_build"]["quant_used"] != args.quant:
            res["notes"].append(
                f"--quant {args.quant} is not available in this checkout (QUANT_MODES = "
                f"{res['bluelower_build']['quant_modes_available']}); bluelower ran {res['bluelower_build']['quant_used']}.")
    if (args.verify or args.size == "tiny") and gguf:
        f32 = M.gguf_path(args.size, "F32", args.seed, log)
        log("[verify] llama.cpp vs PyTorch logits")
        res["verify"] = run_worker(["--verify-worker", "--size", args.size, "--weights", weights, "--gguf", gguf,
                                    "--gguf-f32", f32], timeout=1800)
    log("[bandwidth]")
    res["bandwidth_start"] = mem_bandwidth()
    common = ["--size", args.size, "--weights", weights, "--decode-tokens", str(args.decode_tokens),
              "--max-seconds", str(args.max_seconds)]
    rounds = {e: [] for e in engines}
    servers = {}
    if args.persistent:
        res["notes"].append("persistent workers: each engine loaded once in its own process, rounds interleaved "
                            "A B C A B C over stdin (peak RSS includes the load)")
    for r in range(args.repeats):
        for e in engines:
            argv = ["--worker", e] + common
            if e == "bluelower":
                argv += ["--build-dir", res["bluelower_build"]["build_dir"]]
                if args.profile and r == 0:
                    argv += ["--profile"]
            if e.startswith("llamacpp-"):
                argv += ["--gguf", gguf]
                if e == "llamacpp-default" and default_crash:
                    argv += ["--decode-only"]
            skip = getattr(args, f"skip_{e.split('-')[0]}")
            if r >= args.long_rounds:
                skip = ",".join(x for x in (skip, "prefill2048") if x)
            if skip:
                argv += ["--skip", skip]
            log(f"[round {r + 1}/{args.repeats}] {e}")
            try:
                if args.persistent:
                    if e not in servers:
                        servers[e] = Server(argv + ["--serve"])
                    rounds[e].append(servers[e].round(skip, args.profile and r == 0 and e == "bluelower"))
                else:
                    rounds[e].append(run_worker(argv, timeout=args.worker_timeout))
            except Exception as exc:  # noqa: BLE001
                log(f"  {e} failed: {exc}")
                rounds[e].append({"engine": e, "error": str(exc)[-2000:]})
            last = rounds[e][-1]
            log("  " + ", ".join(f"{k}={v:.2f}" for k, v in last.items() if k.endswith(("tok_s", "rss_mb")) and isinstance(v, float)))
    for sv in servers.values():
        sv.close()
    if llama_engines:
        default = ("llama.cpp's own choice; " + (f"{default_crash} in a probe run, so it is measured for decode only, "
                                                 "its KV cache filled by a no-extra copy of the model" if default_crash
                                                 else "a probe run's batched prefill worked, so it is measured in full"))
        res["notes"].append("llama.cpp runs in each weight-buffer configuration: " + ", ".join(llama_engines) +
                            f" (default = {default}; no-extra = plain CPU kernels; repack = Q4_0 matrices pinned to "
                            "CPU_REPACK); each ratio uses the fastest configuration that completed every round of "
                            "that measurement")
    res["other_processes_end"] = busy_processes()
    res["bandwidth_end"] = mem_bandwidth()
    bw = max(res["bandwidth_start"]["best_GBps"], res["bandwidth_end"]["best_GBps"])
    res["bandwidth_GBps"] = bw
    res["rounds"] = rounds
    summarize(res, cfg, engines)
    prof = [x.get("profile") for x in rounds.get("bluelower", []) if x.get("profile")]
    if prof:
        res["bluelower_profile"] = prof[0]
    res["loadavg_end"] = loadavg()
    res["steal_percent"] = steal_percent(cpu0, cpu_times())
    res["elapsed_s"] = round(time.time() - t_start, 1)
    withhold_if_busy(res, args.allow_busy)
    return res


def withhold_if_busy(res: dict, allow_busy: bool) -> None:
    """Ratios of a run that shared the CPU with another process say nothing about the engines:
    ``targets`` becomes ``targets_withheld`` (unless ``allow_busy``), with a note saying why."""
    busy = quiet_machine_violations(res)
    if busy and "targets" in res and not allow_busy:
        res["targets_withheld"] = res.pop("targets")
        note = ("ratios withheld: the machine was not quiet (" + "; ".join(busy) + "); rerun on a quiet "
                "machine, or --allow-busy to report them anyway")
        if note not in res["notes"]:
            res["notes"].append(note)


def summarize(res: dict, cfg, engines) -> None:
    """Medians, roofline fractions and ratios of ``res["rounds"]`` into ``res`` (``summary``,
    ``llamacpp_best``, ``targets``); also what ``--resummarize`` recomputes for a results file."""
    summary = {}
    for e in engines:
        rs = [x for x in res["rounds"][e] if "error" not in x]
        s = {k: med([x.get(k) for x in rs]) for k in
             ("prefill128_tok_s", "prefill2048_tok_s", "decode128_tok_s", "decode2048_tok_s", "load_s")}
        s["n"] = {k: sum(1 for x in rs if x.get(k) is not None) for k in
                  ("prefill128_tok_s", "prefill2048_tok_s", "decode128_tok_s", "decode2048_tok_s")}
        s["peak_rss_mb"] = max([x.get("peak_rss_mb", 0) for x in rs], default=None)
        quant = res.get("bluelower_build", {}).get("quant_used", "fp32") if e == "bluelower" else (
            "Q4_0" if e.startswith("llamacpp") else "fp32")
        stored = stored_decode_bytes(res["bluelower_build"]["build_dir"]) if e == "bluelower" else None
        if stored is not None:
            s["decode_weight_bytes_from"] = "the build's manifest (functions.decode.weights_bytes_per_call)"
        for ctx in (128, 2048):
            b = M.decode_bytes(cfg, e, quant, ctx, stored)
            s[f"bytes_per_token_{ctx}"] = b
            s[f"roofline_tok_s_{ctx}"] = res["bandwidth_GBps"] * 1e9 / b["total_bytes"]
            got = s.get(f"decode{ctx}_tok_s")
            s[f"roofline_frac_{ctx}"] = got / s[f"roofline_tok_s_{ctx}"] if got else None
        s["skipped"] = sorted({f"{k}: {v}" for x in rs for k, v in x.get("skipped", {}).items()})
        s["errors"] = [x["error"][-300:] for x in res["rounds"][e] if "error" in x]
        s["precision"] = quant
        summary[e] = s
    best = best_llama(summary)
    if best:
        res["llamacpp_best"] = best
    if "bluelower" in summary and best:
        b = summary["bluelower"]
        res["targets"] = {f"{m}_vs_llamacpp": (b[f"{m}_tok_s"] / summary[best[m]][f"{m}_tok_s"])
                          if b[f"{m}_tok_s"] and m in best else None for m in MEASURES}
        res["targets"]["llamacpp_roofline_frac_128"] = summary[best["decode128"]]["roofline_frac_128"] if "decode128" in best else None
        res["targets"]["bluelower_roofline_frac_128"] = b["roofline_frac_128"]
        res["targets"]["bluelower_roofline_frac_2048"] = b["roofline_frac_2048"]
    res["summary"] = summary


MEASURES = ("prefill128", "prefill2048", "decode128", "decode2048")


def best_llama(summary: dict) -> dict:
    """Per measurement, the llama.cpp configuration with the highest median among those that
    completed it in every round (a configuration that crashed in any round does not count)."""
    out = {}
    for m in MEASURES:
        ok = [(s[f"{m}_tok_s"], e) for e, s in summary.items() if e.startswith("llamacpp-") and s[f"{m}_tok_s"]
              and not s["errors"] and s["n"][f"{m}_tok_s"] == max(x["n"][f"{m}_tok_s"] for x in summary.values())]
        if ok:
            out[m] = max(ok)[1]
    return out


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (``/proc/stat``'s ``cpu`` line, in ticks: user nice
    system idle iowait irq softirq steal ...), or None where there is no /proc."""
    try:
        with open("/proc/stat") as fh:
            return [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_percent(before, after) -> float | None:
    """Share of CPU time the hypervisor gave to other guests between two :func:`cpu_times`
    (the ``steal`` column): a virtual machine's timings are not its own above a few percent."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])
    return 100.0 * (after[7] - before[7]) / total if total > 0 else None


def quiet_machine_violations(res: dict, max_load: float = 0.5, max_steal: float = 5.0) -> list[str]:
    """Why the run was not on a quiet machine: another process using the CPU at the start or
    the end, a 1-minute load average above ``max_load`` before the run started, or (when the
    run recorded it) more than ``max_steal`` percent of CPU time stolen by the hypervisor."""
    out = []
    steal = res.get("steal_percent")
    if steal is not None and steal > max_steal:
        out.append(f"{steal:.1f}% of CPU time stolen by the hypervisor (> {max_steal}%)")
    for when in ("start", "end"):
        for p in res.get(f"other_processes_{when}") or []:
            out.append(f"at the {when}: {p}")
    try:
        load = float(str(res.get("loadavg_start", "0")).split()[0])
    except ValueError:
        load = 0.0
    if load > max_load:
        out.append(f"load average {load} > {max_load} before the run")
    return out


def compile_bench(args) -> dict:
    """`bluelower compile` wall time and max RSS: tiny and bluelm-v-3b (host), + aarch64."""
    out = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(), "runs": []}
    exe = os.path.join(os.path.dirname(PY), "bluelower")
    for model, soc in [x.split("@") if "@" in x else (x, "host") for x in args.compile_bench.split(",")]:
        dest = os.path.join(M.CACHE, "compile-bench", f"{model}-{soc}")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        cmd = [exe, "compile", "--model", model, "--soc", soc, "-o", dest]
        log(f"[compile-bench] {' '.join(cmd)}")
        before = loadavg()
        r = timed_child(cmd, env=env_threads(), timeout=args.worker_timeout)
        r.update(model=model, soc=soc, loadavg_before=before, loadavg_after=loadavg())
        out["runs"].append(r)
        log(f"  {r.get('wall_s')} s, {r.get('max_rss_mb')} MB, rc={r.get('rc')}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(M.DECODERS), default="3b")
    ap.add_argument("--quant", default="w4a8kv8")
    ap.add_argument("--llamacpp-bufts", default=",".join(LLAMA_BUFTS),
                    help="llama.cpp weight-buffer configurations to run (default, no-extra, repack)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--allow-busy", action="store_true",
                    help="report the ratios against peers even when another process used the CPU during the run")
    ap.add_argument("--long-rounds", type=int, default=99, help="rounds that include the 2048-token prefill")
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=300.0, help="per-measurement budget (longer: skipped/shortened)")
    ap.add_argument("--worker-timeout", type=float, default=3600.0)
    ap.add_argument("--skip-bluelower", default="")
    ap.add_argument("--skip-llamacpp", default="")
    ap.add_argument("--skip-torch", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify", action="store_true", help="check llama.cpp logits vs PyTorch (always on tiny)")
    ap.add_argument("--profile", action="store_true", help="Relax VM profile of bluelower's decode/prefill (round 1)")
    ap.add_argument("--compile-bench", default="", help="e.g. tiny,bluelm-v-3b,tiny@dimensity9300")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--persistent", type=int, default=None,
                    help="1: keep each engine loaded in one process across rounds (default for tiny/mid); "
                         "0: a fresh process per engine per round (default for 3b: at most one big model resident)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--resummarize", action="store_true",
                    help="recompute results/llm-SIZE.json's medians, rooflines and ratios from its recorded rounds "
                         "(the bookkeeping of this code; no engine runs), then regenerate the docs")
    # worker-only
    ap.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    ap.add_argument("--verify-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--decode-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gguf-f32", help=argparse.SUPPRESS)
    ap.add_argument("--build-dir", help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.chunk, args.long = 128, 2048
    if args.persistent is None:
        args.persistent = int(args.size != "3b")
    if args.worker:
        return worker(args)
    if args.verify_worker:
        return verify(args)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    if args.resummarize:
        from bluelower.lowering.models import load_config

        path = os.path.join(HERE, "results", f"llm-{args.size}.json")
        with open(path, encoding="utf-8") as fh:
            res = json.load(fh)
        summarize(res, load_config(M.config_path(args.size)), list(res["rounds"]))
        withhold_if_busy(res, args.allow_busy)  # the run's own load record decides, as when it ran
        res["notes"] = [n for n in res.get("notes", []) if not n.startswith("summary recomputed")]
        res["notes"].append(f"summary recomputed from the recorded rounds ({time.strftime('%Y-%m-%d')}, "
                                           "--resummarize)")
    elif args.compile_bench:
        res = compile_bench(args)
        res["command"] = " ".join([PY] + sys.argv)
        path = os.path.join(HERE, "results", "compile.json")
    else:
        res = main_bench(args)
        path = os.path.join(HERE, "results", f"llm-{args.size}.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1, sort_keys=True, default=str)
    log(f"wrote {path}")
    if not args.no_docs:
        import _llm_report

        _llm_report.write_docs(os.path.join(HERE, "results"), ROOT)


if __name__ == "__main__":
    main()
