"""The generation loop on the host: a compiled build or the PyTorch reference.

Both backends run the same procedure (docs/bundle-format.md, "Generation procedure"):
encode the image in batches, embed the prompt in chunks, splice image tokens before the
prompt, prefill in fixed-size chunks (the last padded and masked), then greedy decode
until ``max_new_tokens`` or EOS. Only the backend differs, so ``run --check`` compares the
compiled artifact against PyTorch token for token.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import BlueLowerError
from ..lowering.artifacts.bundle import LIBRARY, PARAMS, read_manifest, verify_files
from ..lowering.models import spec_for
from .text import check_prompt_ids


@dataclass
class GenerationResult:
    tokens: list
    timings_s: dict = field(default_factory=dict)
    prompt_rows: int = 0
    image_tokens: int = 0
    first_logits: np.ndarray | None = None
    logits: np.ndarray | None = None  # [steps, vocab] with keep_logits

    def to_json(self) -> dict:
        return {
            "tokens": [int(t) for t in self.tokens],
            "prompt_rows": self.prompt_rows,
            "image_tokens": self.image_tokens,
            "timings_s": {k: round(v, 6) for k, v in self.timings_s.items()},
        }


class _Backend:
    """What the loop needs from a backend; shapes are the compiled ones."""

    chunk: int
    capacity: int
    image_batch: int
    eos: int
    stop_ids: frozenset

    def encode_batch(self, patches: np.ndarray) -> np.ndarray: ...
    def embed_chunk(self, ids: np.ndarray) -> np.ndarray: ...
    def reset_cache(self) -> None: ...
    def prefill_chunk(self, rows: np.ndarray, start: int, num_valid: int) -> np.ndarray: ...
    def decode_step(self, token: int, position: int) -> np.ndarray: ...


IMAGE = "image"  # the image's place among prompt segments (runtime_stubs/text.py's IMAGE works too)


def _segments(patches, prompt) -> list:
    """Prompt segments: id lists and one image marker. Plain ids mean image first, then ids."""
    prompt = list(prompt)
    if any(not isinstance(p, (int, np.integer)) for p in prompt):  # already segments
        segs = [p if not isinstance(p, (list, tuple, np.ndarray)) else [int(x) for x in p] for p in prompt]
        has_image = any(not isinstance(p, list) for p in segs)
        if patches is not None and not has_image:
            segs = [IMAGE] + segs
        if patches is None:
            segs = [p for p in segs if isinstance(p, list)]
        return segs
    return ([IMAGE] if patches is not None else []) + ([[int(x) for x in prompt]] if prompt else [])


def check_capacity(n_image: int, n_ids: int, max_new_tokens, capacity: int) -> None:
    """The prompt's rows (image tokens + ids) and ``max_new_tokens`` fit the KV cache: checked
    before anything runs (the image's rows before its patches are preprocessed)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise BlueLowerError(f"--max-new-tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise BlueLowerError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    n = n_image + n_ids
    if n == 0:
        raise BlueLowerError("nothing to generate from: no image and an empty prompt")
    if n + max_new_tokens > capacity:
        raise BlueLowerError(
            f"prompt of {n} rows ({n_image} image tokens + {n_ids} prompt ids) plus "
            f"{max_new_tokens} new tokens exceeds the KV cache capacity of {capacity}"
        )


def generate(backend: _Backend, patches: np.ndarray | None, prompt, max_new_tokens: int, sampler=None,
             on_token=None, forced=None, keep_logits: bool = False) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens, stopping at the backend's stop ids.

    ``patches`` [k, 3, S, S] float32 (normalized) or None. ``prompt``: token ids (the image
    goes first) or segments, lists of ids and one image marker where the image's rows go
    (``text.build_prompt``). ``sampler``: ``text.Sampler`` (default greedy). ``on_token(id)``
    is called with each new token as it is produced (streaming). ``forced``: teacher-force
    these tokens instead (the result's tokens are them; the logits are the model's at each).
    ``keep_logits``: the result's ``logits`` holds every step's logits row."""
    timings = {"image_encode": 0.0, "embed": 0.0, "prefill": 0.0, "decode": 0.0}
    segs = _segments(patches, prompt)
    ids_all = check_prompt_ids([i for p in segs if isinstance(p, list) for i in p], backend.vocab_size)
    n_image = 0 if patches is None else patches.shape[0] * backend.tokens_per_patch
    n = n_image + len(ids_all)
    check_capacity(n_image, len(ids_all), max_new_tokens, backend.capacity)
    t0 = time.perf_counter()
    image_rows = []
    if patches is not None:
        b = backend.image_batch
        for i in range(0, patches.shape[0], b):
            batch = patches[i : i + b]
            valid = batch.shape[0]
            if valid < b:
                batch = np.concatenate([batch, np.zeros((b - valid,) + batch.shape[1:], np.float32)])
            out = backend.encode_batch(np.ascontiguousarray(batch, dtype=np.float32))
            image_rows.append(out[:valid].reshape(-1, out.shape[-1]))
    t1 = time.perf_counter()
    c = backend.chunk
    rows = []
    for seg in segs:
        if not isinstance(seg, list):
            rows.extend(image_rows)
            continue
        seg_ids = np.asarray(seg, dtype=np.int64)
        for i in range(0, seg_ids.size, c):
            ids = seg_ids[i : i + c]
            valid = ids.size
            padded = np.zeros(c, np.int64)
            padded[:valid] = ids
            rows.append(backend.embed_chunk(padded)[:valid])
    t2 = time.perf_counter()
    seq = np.concatenate(rows).astype(np.float32)
    backend.reset_cache()
    logits = None
    for start in range(0, n, c):
        chunk = seq[start : start + c]
        valid = chunk.shape[0]
        if valid < c:
            chunk = np.concatenate([chunk, np.zeros((c - valid, chunk.shape[1]), np.float32)])
        logits = backend.prefill_chunk(np.ascontiguousarray(chunk), start, valid)
    t3 = time.perf_counter()
    first_logits = np.array(logits, copy=True)
    pick = (lambda lg: int(np.argmax(lg[0]))) if sampler is None else (lambda lg: int(sampler.sample(lg[0])))
    if forced is not None:
        forced = [int(t) for t in forced]
        max_new_tokens = min(max_new_tokens, len(forced))
        pick = lambda _lg: forced[len(tokens)]  # noqa: E731
        stop = frozenset()
    else:
        stop = getattr(backend, "stop_ids", None) or frozenset([backend.eos])
    kept = [first_logits[0]] if keep_logits else None
    tokens: list = []
    tokens.append(pick(logits))
    if on_token is not None:
        on_token(tokens[-1])
    position = n
    while len(tokens) < max_new_tokens and tokens[-1] not in stop:
        logits = backend.decode_step(tokens[-1], position)
        position += 1
        if kept is not None:
            kept.append(np.array(logits[0], copy=True))
        tokens.append(pick(logits))
        if on_token is not None:
            on_token(tokens[-1])
    t4 = time.perf_counter()
    timings.update(image_encode=t1 - t0, embed=t2 - t1, prefill=t3 - t2, decode=t4 - t3)
    if len(tokens) > 1:
        timings["decode_tokens_per_s"] = (len(tokens) - 1) / max(t4 - t3, 1e-9)
    return GenerationResult(tokens, timings, prompt_rows=n, image_tokens=n_image, first_logits=first_logits,
                            logits=np.stack(kept) if kept is not None else None)


def load_tokenizer(build_dir: str, manifest: dict):
    """The build's tokenizer (``runtime_stubs/text.py``), or None for a build without one."""
    info = manifest.get("tokenizer")
    if not info:
        return None
    from .text import Tokenizer

    path = os.path.join(build_dir, info.get("file", "tokenizer.json"))
    if not os.path.isfile(path):
        raise BlueLowerError(f"{build_dir}: missing file {info.get('file', 'tokenizer.json')}")
    vocab = manifest.get("runtime", {})
    tok = Tokenizer(path, bos_token=info.get("bos_token"), eos_token=info.get("eos_token"),
                    chat_template=info.get("chat_template"))
    if tok.vocab_size > int(vocab.get("vocab_size", tok.vocab_size)):
        raise BlueLowerError(f"{build_dir}: the tokenizer has {tok.vocab_size} tokens, the model {vocab['vocab_size']}")
    return tok


# --------------------------------------------------------------------- compiled build

# ELF e_machine -> the architecture name in a target triple
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 243: "riscv64"}


def _nbytes(shape, dtype: str) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * np.dtype(dtype).itemsize


def _tvm_message(exc: BaseException) -> str:
    """TVM's error in one line: its first line and, when it says more, its last."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0].rstrip(":") + ("; " + lines[-1] if len(lines) > 1 else "")


def host_arch() -> str:
    import platform

    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def check_host_library(build_dir: str, manifest: dict) -> None:
    """``model.so`` is a shared library for this machine: the manifest's target and the
    file's own ELF header say the host's architecture (an aarch64 build runs with ``--native``)."""
    triple = str((manifest.get("target") or {}).get("mtriple") or "")
    with open(os.path.join(build_dir, LIBRARY), "rb") as fh:
        head = fh.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise BlueLowerError(f"{build_dir}: {LIBRARY} is not a shared library (no ELF header)")
    machine = _ELF_MACHINES.get(int.from_bytes(head[18:20], "little"), f"ELF machine {head[18] | head[19] << 8}")
    here = host_arch()
    built_for = next((a for a in (triple.split("-")[0] if triple else here, machine) if a != here), None)
    if built_for is not None:
        how = ("run it with --native (the bundle's own binary; qemu-aarch64 here)"
               if os.path.isfile(os.path.join(build_dir, "bin", "bluelower-run"))
               else "make a device bundle with `bluelower build` and run that with --native, or run it on the device")
        raise BlueLowerError(f"{build_dir} is built for {built_for} ({LIBRARY}: {machine}, target {triple or '?'}), "
                             f"this machine is {here}: {how}")


def check_host_memory(build_dir: str, what: str, nbytes: int) -> None:
    """``nbytes`` for ``what`` fit this machine's physical memory (else one line, before the
    allocation that would fail)."""
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > have:
        raise BlueLowerError(f"{build_dir}: {what} needs {nbytes / 2**30:.4g} GiB, more than this machine's "
                             f"{have / 2**30:.4g} GiB of memory")


def check_vm_functions(build_dir: str, manifest: dict, vm) -> None:
    """Every function the manifest lists is in the library with the arguments it lists
    (inputs, then the weights by name): the library is this build's, not another's."""
    from ..lowering.frontend.entries import sanitize

    for name, fn in manifest["functions"].items():
        try:
            arity = vm._get_function_arity(name)
            names = [vm._get_function_param_name(name, i) for i in range(arity)]
        except Exception:  # TVM: unknown function
            raise BlueLowerError(f"{build_dir}: {LIBRARY} has no function {name} (the manifest lists it: "
                                 "a library of another build?)") from None
        want = [sanitize(p) for p in fn["params"]]
        got = names[len(fn["inputs"]):]
        # the ONNX importer's parameter names carry its wrapper's prefix (m_<name>)
        if arity != len(fn["inputs"]) + len(want) or not all(g == w or g.endswith("_" + w) for g, w in zip(got, want)):
            raise BlueLowerError(f"{build_dir}: {LIBRARY}'s {name} takes {arity} arguments, not the manifest's "
                                 f"{len(fn['inputs'])} inputs + {len(want)} weights (a library of another build?)")



class CompiledModel(_Backend):
    """A host build loaded into TVM's Relax VM."""

    def __init__(self, build_dir: str, verify: bool = True):
        import tvm
        from tvm import relax

        from ..lowering.frontend.weights import WeightSource

        self.manifest = manifest = read_manifest(build_dir)
        if verify:
            verify_files(build_dir, manifest)
        rt = manifest["runtime"]
        self.chunk, self.capacity = rt["prefill_chunk"], rt["kv_capacity"]
        self.image_batch, self.eos = rt["image_batch"], rt["eos_token_id"]
        self.stop_ids = frozenset([rt["eos_token_id"], *rt.get("stop_token_ids", [])])
        self.tokens_per_patch, self.vocab_size = rt["image_tokens_per_patch"], rt["vocab_size"]
        self.image_size = rt["image_size"]
        self.build_dir = build_dir
        self.kv_spec = manifest.get("kv_cache")  # None: a model without a decoder
        self.kv = None
        check_host_library(build_dir, manifest)
        if self.kv_spec:
            check_host_memory(build_dir, "the KV cache", _nbytes(self.kv_spec["shape"], self.kv_spec["dtype"]))
        try:
            lib = tvm.runtime.load_module(os.path.join(build_dir, LIBRARY))
            self.dev = tvm.cpu()
            self.vm = relax.VirtualMachine(lib, self.dev)
        except Exception as exc:  # TVM's own error types
            raise BlueLowerError(f"{build_dir}: cannot load {LIBRARY}: {_tvm_message(exc)}") from None
        check_vm_functions(build_dir, manifest, self.vm)
        params = WeightSource(os.path.join(build_dir, PARAMS))
        cache = {}
        self.params = {}
        for fname, fn in manifest["functions"].items():
            for p in fn["params"]:
                if p not in params.tensors:
                    raise BlueLowerError(f"{build_dir}: {PARAMS} has no tensor '{p}' (functions.{fname} needs it)")
                if p not in cache:
                    cache[p] = tvm.runtime.tensor(params.read(p), self.dev)
            self.params[fname] = [cache[p] for p in fn["params"]]

    def call(self, name, *inputs):
        """Run the build's function ``name`` on ``inputs`` (numpy arrays or TVM tensors) with its weights."""
        import tvm

        args = [tvm.runtime.tensor(x, self.dev) if isinstance(x, np.ndarray) else x for x in inputs]
        try:
            out = self.vm[name](*args, *self.params[name])
        except (TypeError, ValueError, RuntimeError) as exc:
            # a build whose library and parameters disagree (a tensor of another shape or dtype)
            raise BlueLowerError(f"{self.build_dir}: {LIBRARY} refused its arguments in {name}: "
                                 f"{_tvm_message(exc)}") from None
        # the torch importer returns a 1-tuple for one output, the ONNX one a tensor
        if not hasattr(out, "numpy") and len(out) == 1:
            return out[0]
        return out

    def encode_outputs(self, patches) -> list:
        """Every output of the image entry for one patch batch (a SigLIP tower with its head:
        the tokens and the pooled vector); through the TileImagePatches stages (Conv2D, then
        blocks) when the build has them, as a scheduler would run them."""
        if "encode_image_embed" in self.params and "encode_image_blocks" in self.params:
            out = self.call("encode_image_blocks", self.call("encode_image_embed", patches))
        else:
            out = self.call("encode_image", patches)
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]

    def encode_batch(self, patches):
        """The image tokens of one patch batch (the image entry's first output)."""
        return self.encode_outputs(patches)[0]

    def encode_batch_split(self, patches):
        embeddings = self.call("encode_image_embed", patches)
        out = self.call("encode_image_blocks", embeddings)
        return (out if hasattr(out, "numpy") else out[0]).numpy()

    def encode_batch_unsplit(self, patches):
        out = self.call("encode_image", patches)
        return (out if hasattr(out, "numpy") else out[0]).numpy()

    def embed_chunk(self, ids):
        return self.call("embed", ids).numpy()

    def reset_cache(self):
        import tvm

        self.kv = tvm.runtime.tensor(np.zeros(self.kv_spec["shape"], dtype=self.kv_spec["dtype"]), self.dev)

    def prefill_chunk(self, rows, start, num_valid):
        out = self.call("prefill", rows, self.kv, np.array([start], np.int64), np.array([num_valid], np.int64))
        self.kv = out[1]
        return out[0].numpy()

    def decode_step(self, token, position):
        out = self.call("decode", np.array([token], np.int64), self.kv, np.array([position], np.int64))
        self.kv = out[1]
        return out[0].numpy()


# ------------------------------------------------------------------ PyTorch reference


class TorchReference(_Backend):
    """The PyTorch model (eager, fp32), shaped like the compiled build. ``weights``: a
    safetensors path in the module's names, a weight source (``.read(name)``), or None
    (the seeded random weights)."""

    def __init__(self, cfg, weights=None, seed: int = 0):
        import torch

        from ..lowering.frontend.weights import WeightSource, load_torch_model

        self.torch = torch
        self.cfg = cfg
        source = WeightSource(weights) if isinstance(weights, str) else weights
        self.model = load_torch_model(cfg, source, seed)
        r = cfg.runtime
        self.chunk, self.capacity, self.image_batch, self.eos = r.prefill_chunk, r.kv_capacity, r.image_batch, r.eos_token_id
        self.stop_ids = frozenset(cfg.stop_ids)
        self.tokens_per_patch, self.vocab_size = cfg.image_tokens_per_patch, cfg.decoder.vocab_size
        self.kv = None

    def encode_batch(self, patches):
        with self.torch.no_grad():
            return self.model.encode_image(self.torch.from_numpy(patches)).numpy()

    def embed_chunk(self, ids):
        with self.torch.no_grad():
            return self.model.embed(self.torch.from_numpy(ids)).numpy()

    def reset_cache(self):
        self.kv = self.torch.zeros(spec_for(self.cfg).kv_cache_shape(self.cfg), dtype=self.torch.float32)

    def prefill_chunk(self, rows, start, num_valid):
        t = self.torch
        with t.no_grad():
            logits, self.kv = self.model.prefill(t.from_numpy(rows), self.kv, t.tensor([start]), t.tensor([num_valid]))
        return logits.numpy()

    def decode_step(self, token, position):
        t = self.torch
        with t.no_grad():
            logits, self.kv = self.model.decode(t.tensor([token]), self.kv, t.tensor([position]))
        return logits.numpy()


def reference_for_build(build_dir: str, weights_path: str | None = None) -> TorchReference:
    """The fp32 PyTorch reference of a build: its config; its weights: ``weights_path``, else
    the build's own ``params.safetensors`` when it holds fp32 weights, else the checkpoint or
    weights file it was compiled from, else the seed."""
    from ..lowering.models import config_from_dict

    manifest = read_manifest(build_dir)
    cfg = config_from_dict(manifest["model"], "manifest.json:model")
    inputs = manifest.get("inputs", {})
    weights = weights_path
    if weights is None and manifest.get("quant") == "fp32":
        weights = os.path.join(build_dir, PARAMS)  # the build's own fp32 weights
    elif weights is None:
        weights = inputs.get("checkpoint") if isinstance(inputs.get("checkpoint"), str) else inputs.get("weights_path")
        if weights is not None and not os.path.exists(weights):
            raise BlueLowerError(f"{build_dir} was compiled from {weights}, which is gone: "
                                 "give the fp32 weights with --weights")
    if isinstance(weights, str) and (os.path.isdir(weights) or weights.endswith(".gguf")):
        from ..lowering.frontend.sources import checkpoint_source

        weights = checkpoint_source(weights).weights  # a Hugging Face directory or a GGUF file
    return TorchReference(cfg, weights, seed=int(inputs.get("seed", 0)))
