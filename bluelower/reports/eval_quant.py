"""Accuracy of the quantized builds against the fp32 PyTorch reference (``bluelower eval-quant``).

For each mode (fp32, w8, w4a16, w4a16kv8) the model is compiled with the same seeded
random weights, then on one image + prompt:

* ``image_tokens_rel_err``: ``||y - y_ref|| / ||y_ref||`` of ``encode_image``;
* ``prefill_logits_rel_err``: the same for the logits of the last prefill chunk;
* ``decode_logits_rel_err``: mean over the decode steps, *teacher-forced* (both models
  are fed the reference's greedy tokens, so the error is per step, not compounded);
* ``teacher_forced_top1``: fraction of decode steps whose argmax equals the reference's;
* ``greedy_prefix``: free-running greedy generation, number of leading tokens identical
  to the reference's (EOS does not stop either run);
* ``kernel_rel_err``: decode logits against PyTorch run with the build's *dequantized*
  weights (the kernels' own arithmetic error, ~1e-6 when they are right).

The reference for ``run --check`` on a quantized build is :func:`check_reference`; for an
INT8 KV cache (``w4a16kv8``) it also stores its cache rows as the build does
(:class:`Int8KVRows`: the write kernel's quantization, following the build's codes where
float32 noise decides a rounding tie, checked); for int8 activations (``w4a8*``, ``w8a8``)
its quantized linear layers read their inputs through per-token int8 as the build's
kernels do (:class:`Int8Activations`, following the build's codes the same way).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from ..lowering.artifacts.bundle import PARAMS, read_manifest
from ..runtime_stubs.generate import TorchReference, reference_for_build

MODES = ("fp32", "w8", "w4a16", "w4a16kv8")


class DequantizedReference(TorchReference):
    """The PyTorch model with a quantized build's weights, dequantized exactly as the
    kernels use them (so ``run --check`` can demand identical tokens). For an INT8 KV cache
    (``w4a16kv8``) its cache rows are stored as the build stores them (:class:`Int8KVRows`);
    for int8 activations (the ``a8`` modes) its quantized linear layers quantize their inputs
    per token as the build's kernels do (:class:`Int8Activations`).

    With ``follow_build_rounding`` and a build this machine can load (a host build, not a
    cross-compiled bundle), the build runs each step too and the reference follows its stored
    KV rows and its activation codes where float32 noise decided a rounding tie (checked:
    anything but a tie is an error). A cross-compiled build is not followed: its reference
    rounds on its own, so a tie decided the other way can change a later token."""

    def __init__(self, build_dir: str, follow_build_rounding: bool = True):
        import torch

        from ..lowering.models import config_from_dict, spec_for
        from ..lowering.quant.params import dequantized_state

        manifest = read_manifest(build_dir)
        cfg = config_from_dict(manifest["model"], "manifest.json:model")
        tied_linear: dict = {}  # a tied table whose logits read other values than its lookups
        state = {n: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                 for n, a in dequantized_state(os.path.join(build_dir, PARAMS), manifest, tied_linear).items()}
        with torch.device("meta"):
            model = spec_for(cfg).build_module(cfg)
        model.load_state_dict(state, assign=True)
        params = dict(model.named_parameters(remove_duplicate=False))
        # id(table) -> (its name, the values F.linear reads for the logits)
        self.tied = {id(params[n]): (n, torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
                     for n, w in tied_linear.items() if n in params}
        self.torch = torch
        self.cfg = cfg
        self.model = model.eval()
        r = cfg.runtime
        self.chunk, self.capacity, self.image_batch, self.eos = r.prefill_chunk, r.kv_capacity, r.image_batch, r.eos_token_id
        self.tokens_per_patch, self.vocab_size = cfg.image_tokens_per_patch, cfg.decoder.vocab_size
        self.stop_ids = frozenset(cfg.stop_ids)
        self.kv = None
        self.kv_int8 = None
        self.act_int8 = None
        quantization = manifest.get("quantization", {})
        a8 = quantization.get("activations") == "int8"
        kv8 = manifest.get("kv_cache", {}).get("dtype") == "int8"
        self.build = None  # the build run beside the reference (its steps followed)
        if follow_build_rounding and (a8 or kv8) and host_loadable(manifest):
            from ..runtime_stubs.generate import CompiledModel

            self.build = BuildSteps(CompiledModel(build_dir), capture_activations=a8)
        if kv8:
            self.kv_int8 = Int8KVRows(spec_for(cfg).kv_cache_shape(cfg),
                                      build=None if self.build is None else self.build.model)
        if a8:
            self.act_int8 = Int8Activations(self.model, quantized_linear_sources(manifest), self.tied)

    def reset_cache(self):
        super().reset_cache()
        if self.build is not None:
            self.build.model.reset_cache()

    def _followed(self, run_build, run_ref, writes_cache: bool = True):
        """``(build's result or None, reference's result)`` of one step: the build's same step
        first when followed. ``writes_cache``: the step writes the KV cache (not the image
        encoder)."""
        built, captured = self.build.run(run_build) if self.build is not None else (None, None)
        with contextlib.ExitStack() as stack:
            if self.kv_int8 is not None and writes_cache:
                stack.enter_context(self.kv_int8.step(None))
            if self.act_int8 is not None:
                stack.enter_context(self.act_int8.step(captured))  # the tied tables' logits too
            elif self.tied:
                stack.enter_context(tables_as_linear(self.tied))
            return built, run_ref()

    def encode_batch(self, patches):
        """The image tokens. Followed (int8 activations): the build's, after checking the
        reference's own are within float32 noise of them (``_TOKENS_REL``), so the decoder of the
        build the reference follows sees exactly the rows of the build under test (float32 noise
        in them would otherwise decide rounding ties there differently)."""
        if self.act_int8 is None:
            return super().encode_batch(patches)
        built, own = self._followed(lambda build: build.encode_batch(patches),
                                    lambda: super(DequantizedReference, self).encode_batch(patches), writes_cache=False)
        if built is None:
            return own
        err = _rel(own, built)
        if not err <= _TOKENS_REL:
            from ..errors import BlueLowerError

            raise BlueLowerError(f"run --check: the build's image tokens differ from the reference's by {err:.3g} "
                                 f"(relative; float32 noise is below {_TOKENS_REL:g}): a bug of the image encoder")
        return built

    def prefill_chunk(self, rows, start, num_valid):
        if self.kv_int8 is None and self.act_int8 is None and not self.tied:
            return super().prefill_chunk(rows, start, num_valid)
        return self._followed(lambda build: build.prefill_chunk(rows, start, num_valid),
                              lambda: super(DequantizedReference, self).prefill_chunk(rows, start, num_valid))[1]

    def decode_step(self, token, position):
        if self.kv_int8 is None and self.act_int8 is None and not self.tied:
            return super().decode_step(token, position)
        return self._followed(lambda build: build.decode_step(token, position),
                              lambda: super(DequantizedReference, self).decode_step(token, position))[1]


def host_loadable(manifest: dict) -> bool:
    """The build's library runs on this machine (no cross-compiled ``mtriple``, or this one's)."""
    import platform

    triple = str((manifest.get("target") or {}).get("mtriple") or "")
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    return not triple or triple.split("-")[0] == machine


class BuildSteps:
    """A host build (``CompiledModel``) run step for step beside the reference: :meth:`run`
    runs one step on it and returns what its activation pre-passes (``quantize_act_int8``)
    computed, in call order, as ``(x, codes, scales)`` numpy arrays (a VM instrument)."""

    PREFIX = "quantize_act_int8"

    def __init__(self, model, capture_activations: bool):
        self.model = model
        self._captured = None
        if capture_activations:
            model.vm.set_instrument(self._instrument)

    def _instrument(self, _func, symbol, before_run, _ret, *args):
        if not before_run and self._captured is not None and str(symbol).startswith(self.PREFIX):
            self._captured.append((args[0].numpy(), args[1].numpy(), args[2].numpy()))
        return 0  # VMInstrumentReturnKind.NO_OP

    def run(self, step) -> tuple:
        """``(step(model)'s result, the activations captured meanwhile)``."""
        self._captured = []
        try:
            out = step(self.model)
            return out, self._captured
        finally:
            self._captured = None


def quantized_linear_sources(manifest: dict) -> list:
    """The weights a build stores for linear layers (not embedding rows): the layers whose
    inputs an a8 build quantizes."""
    params = manifest.get("quantization", {}).get("params", {})
    return sorted({source for source, quantizer, _args in params.values() if not quantizer.endswith("_rows")})


class Int8Activations:
    """The reference's quantized linear layers read their inputs through per-token int8
    (``lowering/quant/activations.py``: bit for bit the build's pre-pass on the same values).

    In :meth:`step` with the build's captured pre-pass results (:class:`BuildSteps`), the
    layers consume them in order (one per distinct input tensor, as the build quantizes q/k/v's
    shared input once) and use the build's codes after checking them against the reference's
    own quantization of its input (:func:`follow_codes`); without them (a build not followed)
    each layer rounds its own input."""

    def __init__(self, model, weight_names, tied: dict | None = None):
        import torch

        from ..lowering.quant.activations import linear_selector, tag_parameter_names

        tag_parameter_names(model)
        self.model = model
        self.select = linear_selector(weight_names)
        # weights read by F.linear but not an nn.Linear's (a tied lm_head reads the token
        # table): id -> (name, the values it reads: a tied table's linear layout, else itself)
        linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        self.tables = {}
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if isinstance(w, torch.nn.Parameter) and id(w) not in linear_weights and self.select(name, module):
                self.tables[id(w)] = (tied or {}).get(id(w), (f"{name}.weight", w))

    @contextlib.contextmanager
    def step(self, captured: list | None):
        from ..lowering.quant.activations import fake_quant_rows, int8_activations

        seen: dict = {}  # id(input) -> (input, its int8 value): the tensor is kept, so its id is not reused
        queue = list(captured) if captured is not None else None
        used = [0]

        def rows(name, x):
            hit = seen.get(id(x))
            if hit is not None and hit[0] is x:
                return hit[1]
            if queue is None:
                out = fake_quant_rows(x)
            else:
                out = self._follow(name, x, queue, used[0])
                used[0] += 1
            seen[id(x)] = (x, out)
            return out

        with int8_activations(self.model, self.select, rows), tables_as_linear(self.tables, rows):
            yield
        if queue is not None and used[0] != len(queue):
            from ..errors import BlueLowerError

            raise BlueLowerError(f"run --check: the build quantized {len(queue)} activations in this step, the "
                                 f"reference's quantized linear layers read {used[0]}: the int8 activations cannot be followed")

    @staticmethod
    def _follow(name, x, queue, i):
        import torch

        from ..errors import BlueLowerError

        k = x.shape[-1]
        own = x.detach().float().reshape(-1, k).numpy()
        if i >= len(queue):
            raise BlueLowerError(f"run --check: the reference's layer {name} quantizes an activation the build did not "
                                 f"(only {len(queue)} in this step): the int8 activations cannot be followed")
        _xb, codes, scale = queue[i]
        if codes.shape[0] != own.shape[0] or codes.shape[1] < k:
            raise BlueLowerError(f"run --check: the build's activation {i} of this step is {list(codes.shape)}, "
                                 f"the reference's layer {name} reads {list(own.shape)}: they cannot be followed")
        followed = follow_codes(own, codes[:, :k], scale, f"activation of {name} ")
        return torch.from_numpy(followed).reshape(x.shape).to(x.dtype)


@contextlib.contextmanager
def tables_as_linear(tables: dict, rows=None):
    """Within the block, ``F.linear(x, W)`` for a weight ``W`` of ``tables`` (``id(W) ->
    (name, values)``; weights that are not an ``nn.Linear``'s, e.g. a tied lm_head's token
    table) multiplies by ``values`` (a tied table's linear-layout values when its lookups read
    others) and, with ``rows``, reads ``rows(name, x)`` (the a8 modes' int8 input, in call
    order, like ``int8_activations`` for the ``nn.Linear`` layers, whose own ``F.linear``
    calls are left alone)."""
    if not tables:
        yield
        return
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.linear and len(args) >= 2 and id(args[1]) in tables:
                name, values = tables[id(args[1])]
                args = (args[0] if rows is None else rows(name, args[0]), values, *args[2:])
            return func(*args, **kwargs)

    with Mode():
        yield


def follow_codes(rows: np.ndarray, codes: np.ndarray, scale: np.ndarray, where: str) -> np.ndarray:
    """The build's per-token int8 ``codes`` [M, K] and ``scale`` [M] of the reference's own
    ``rows`` [M, K], as values (``codes * scale``), after checking they are the reference's own
    quantization of its rows up to float32 noise: equal scales (relative ``_SCALE_REL``) and
    codes, except codes one apart where the reference's value sits on a rounding boundary
    (the rule of :func:`follow_stored_rows`). Anything else is a :class:`BlueLowerError`."""
    from ..errors import BlueLowerError
    from ..lowering.kernels import quantize_act_rows

    own, s_own = quantize_act_rows(rows)
    codes = np.asarray(codes, np.int8)
    scale = np.asarray(scale, np.float32)
    if not (np.array_equal(own, codes) and np.array_equal(s_own, scale)):
        bad_scale = np.abs(s_own - scale) > _SCALE_REL * np.maximum(s_own, np.finfo(np.float32).tiny)
        with np.errstate(divide="ignore", invalid="ignore"):
            units = np.abs(rows) * np.where(s_own > 0, 1 / s_own, 0)[:, None]
        tie = np.abs(units - np.floor(units) - 0.5) <= _CODE_TIE
        step = np.abs(own.astype(np.int32) - codes.astype(np.int32))
        bad = bad_scale | ((step > 1) | (step == 1) & ~tie).any(axis=-1)
        if bad.any():
            r = int(np.argwhere(bad)[0][0])
            raise BlueLowerError(f"run --check: the build's int8 {where}row {r} is not the reference's quantization "
                                 f"of that row (codes {codes[r][:6].tolist()}... vs {own[r][:6].tolist()}..., scale "
                                 f"{float(scale[r]):.6g} vs {float(s_own[r]):.6g}): a bug of the int8 activations")
    return codes.astype(np.float32) * scale[:, None]


# ---------------------------------------------------------------- the INT8 KV cache of the reference


def stored_kv_rows(rows: np.ndarray) -> np.ndarray:
    """K/V rows ``[..., head_dim]`` as an INT8-KV build stores them and its fused attention
    reads them back: ``quantize_kv_rows`` (``kv_cache_write_int8``'s rounding bit for bit:
    ``round_half_even(x * float32(127 / amax))`` clipped to +-127, float32 scale ``amax / 127``,
    an all-zero row scale 0), then ``float32(code) * scale``."""
    from ..lowering.kernels.attention import dequantize_kv_rows, quantize_kv_rows

    return dequantize_kv_rows(quantize_kv_rows(rows))


# A followed build's image tokens may differ from the reference's by this much (relative norm):
# float32 noise with the activation codes followed (measured ~1e-7 on tiny)
_TOKENS_REL = 1e-4

# A code of the build may differ by one from the reference's only where the reference's own
# value lies this close (in code units) to a rounding boundary; a scale by this much (relative).
_CODE_TIE, _SCALE_REL = 1e-2, 1e-4


def follow_stored_rows(rows: np.ndarray, stored: np.ndarray, where: str) -> np.ndarray:
    """The reference's own K/V ``rows`` [..., D] replaced by the build's INT8 ``stored`` rows
    [..., D + 4] of the same positions, dequantized, after checking they are the reference's
    own quantization up to float32 noise: equal scales (relative ``_SCALE_REL``) and codes,
    except codes one apart where the reference's value sits on a rounding boundary. Anything
    else is a compiler bug, a :class:`BlueLowerError` naming ``where``.

    Why: the format alone (same rounding, scale, zero rows) does not make the two agree. Float32
    noise in K/V (another summation order, ~1e-6) flips a code wherever a value lies that close
    to a rounding boundary; the flipped code (one step, ~1% of the row's range) moves the next
    layer's K/V by far more than the noise, which flips more codes there. Measured on SmolLM2
    (30 layers, w4a16kv8, 40 teacher-forced steps): the build against a reference rounding its
    own rows, max |logit difference| per step median 0.16 (max 0.29); two such references whose
    weights differ by 1e-7 (relative), 0.17 (max 0.37); the build against this reference,
    2.7e-5 (max 5.6e-5, relative 7e-7), as a float32 cache build agrees with its reference."""
    from ..errors import BlueLowerError
    from ..lowering.kernels.attention import dequantize_kv_rows, quantize_kv_rows

    own = quantize_kv_rows(rows)
    if not np.array_equal(own, stored):
        d = rows.shape[-1]
        scale = lambda q: np.ascontiguousarray(q[..., d:]).view("<f4")  # noqa: E731
        s_own, s_build = scale(own), scale(stored)
        bad = np.abs(s_own - s_build) > _SCALE_REL * np.maximum(s_own, np.finfo(np.float32).tiny)
        with np.errstate(divide="ignore", invalid="ignore"):
            units = np.abs(rows) * np.where(s_own > 0, 1 / s_own, 0)  # |x| in code steps
        tie = np.abs(units - np.floor(units) - 0.5) <= _CODE_TIE
        step = np.abs(own[..., :d].astype(np.int32) - stored[..., :d].astype(np.int32))
        bad = bad[..., 0] | ((step > 1) | (step == 1) & ~tie).any(axis=-1)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            got, want = stored[at][:6].tolist(), own[at][:6].tolist()
            raise BlueLowerError(f"run --check: the build's INT8 KV cache row {where}{list(at)} is not the "
                                 f"reference's quantization of that row (codes {got}... vs {want}..., scale "
                                 f"{float(s_build[at][0]):.6g} vs {float(s_own[at][0]):.6g}): a bug of the INT8 KV-cache write")
    return dequantize_kv_rows(stored)


class Int8KVRows:
    """The PyTorch reference's KV cache stored as an INT8-KV build stores it.

    While the reference runs a step (:meth:`step`), every per-layer cache update
    ``layer_cache.scatter(2, index, rows)`` of the family's module (a layer is
    ``[2, kv_heads, capacity, head_dim]``, the layers in order) writes :func:`stored_kv_rows`
    of its rows, so every later read sees exactly what the build's fused attention reads.
    With ``build_dir`` the build itself runs the same step first and its stored rows are
    followed (:func:`follow_stored_rows`): checked against the reference's own quantization,
    then used, so float noise never decides a rounding differently. A step whose module does
    not write every layer that way is an error (else a float32 cache would be compared)."""

    def __init__(self, cache_shape, build_dir: str | None = None, build=None):
        from ..runtime_stubs.generate import CompiledModel

        self.cache_shape = tuple(cache_shape)
        self.build = CompiledModel(build_dir) if build_dir is not None else build

    def reset(self):
        if self.build is not None:
            self.build.reset_cache()

    @contextlib.contextmanager
    def step(self, run_build):
        """Around one reference step; ``run_build(build)`` runs the same step on the build
        (None: the caller ran it already)."""
        from ..errors import BlueLowerError

        if self.build is not None and run_build is not None:
            run_build(self.build)
        writes = _int8_cache_writes(self, None if self.build is None else self.build.kv.numpy())
        with writes:
            yield
        if writes.layers != self.cache_shape[0]:
            raise BlueLowerError(f"run --check: the reference wrote {writes.layers} of {self.cache_shape[0]} KV-cache "
                                 "layers through layer_cache.scatter(2, index, rows); its INT8 cache cannot be emulated")

    def rows(self, rows, index, layer: int, stored):
        """What layer ``layer``'s update writes in place of ``rows`` [2, kv_heads, T, D]."""
        import torch

        own = rows.detach().numpy()
        if stored is None:
            return torch.from_numpy(stored_kv_rows(own))
        positions = index.detach().numpy()[0, 0, :, 0]
        return torch.from_numpy(follow_stored_rows(own, stored[layer][:, :, positions], f"(layer {layer}) "))


def _int8_cache_writes(cache: Int8KVRows, stored):
    """A ``TorchFunctionMode`` replacing the rows of each per-layer cache ``scatter``."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Int8CacheWrites(TorchFunctionMode):
        layers = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if (func in (torch.Tensor.scatter, torch.scatter) and len(args) == 4 and not kwargs
                    and tuple(args[0].shape) == cache.cache_shape[1:] and args[1] == 2):
                args = (*args[:3], cache.rows(args[3], args[2], self.layers, stored))
                self.layers += 1
            return func(*args, **(kwargs or {}))

    return Int8CacheWrites()


def check_reference(build_dir: str, weights_path: str | None = None):
    """The reference ``run --check`` compares with: for an fp32 build (or with explicit
    ``--weights``) the fp32 PyTorch model; for a quantized build the PyTorch model with the
    build's dequantized weights, so the check tests the compiler, not the rounding."""
    manifest = read_manifest(build_dir)
    if manifest.get("quant", "fp32") != "fp32" and weights_path is None and manifest.get("quantization", {}).get("params"):
        return DequantizedReference(build_dir)
    return reference_for_build(build_dir, weights_path)


# ---------------------------------------------------------------- the measurement


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _sequence(backend, patches, prompt_ids):
    """Image tokens and the prefill of image + prompt (docs/bundle-format.md, steps 1-4)."""
    image_tokens = backend.encode_batch(np.ascontiguousarray(patches[: backend.image_batch], dtype=np.float32))
    rows = [image_tokens.reshape(-1, image_tokens.shape[-1])[: patches.shape[0] * backend.tokens_per_patch]]
    c = backend.chunk
    for i in range(0, len(prompt_ids), c):
        ids = np.zeros(c, np.int64)
        part = prompt_ids[i : i + c]
        ids[: len(part)] = part
        rows.append(backend.embed_chunk(ids)[: len(part)])
    seq = np.concatenate(rows).astype(np.float32)
    backend.reset_cache()
    logits = None
    for start in range(0, seq.shape[0], c):
        chunk = seq[start : start + c]
        valid = chunk.shape[0]
        if valid < c:
            chunk = np.concatenate([chunk, np.zeros((c - valid, chunk.shape[1]), np.float32)])
        logits = backend.prefill_chunk(np.ascontiguousarray(chunk), start, valid)
    return image_tokens, np.array(logits, copy=True), seq.shape[0]


def _teacher_forced(backend, fed: list, position: int) -> list:
    """Decode logits when fed the tokens ``fed`` (the reference's), right after the prefill."""
    return [np.array(backend.decode_step(int(tok), position + j), copy=True) for j, tok in enumerate(fed)]


def _greedy(backend, first_logits, position: int, n: int) -> list:
    tokens = [int(np.argmax(first_logits[0]))]
    while len(tokens) < n:
        logits = backend.decode_step(tokens[-1], position + len(tokens) - 1)
        tokens.append(int(np.argmax(logits[0])))
    return tokens


def eval_patches(cfg, seed: int = 0) -> np.ndarray:
    """One deterministic normalized patch ``[1, 3, S, S]`` (smooth random image in [-1, 1])."""
    rng = np.random.default_rng(1000 + seed)
    s = cfg.vision.image_size
    coarse = rng.uniform(-1, 1, (3, 12, 12)).astype(np.float32)
    img = np.kron(coarse, np.ones((1, s // 12 + 1, s // 12 + 1), np.float32))[:, :s, :s]
    return (img + 0.1 * rng.standard_normal((3, s, s)).astype(np.float32)).clip(-1, 1)[None]


def evaluate(model: str = "tiny", modes=MODES, tokens: int = 64, seed: int = 0, group_size: int = 32,
             prompt_ids=None, work_dir: str | None = None, disabled_passes=()) -> dict:
    """Compile ``model`` in each mode and measure it against the fp32 PyTorch reference."""
    from .. import progress
    from ..runtime_stubs.generate import CompiledModel
    from ..lowering.artifacts.compile import CompileRequest, compile_model
    from ..lowering.models import load_config

    from .eval_text import code_fingerprint

    fingerprint = code_fingerprint()  # of the code as it was when the numbers were made
    cfg = load_config(model)
    if prompt_ids is None:
        prompt_ids = [int(v) for v in np.random.default_rng(seed).integers(3, cfg.decoder.vocab_size, 24)]
    patches = eval_patches(cfg, seed)
    n_rows = cfg.image_tokens_per_patch + len(prompt_ids)
    if n_rows + tokens > cfg.runtime.kv_capacity:
        tokens = cfg.runtime.kv_capacity - n_rows
    ref = TorchReference(cfg, None, seed)
    ref_image, ref_prefill, n = _sequence(ref, patches, prompt_ids)
    ref_tokens = _greedy(ref, ref_prefill, n, tokens)
    ref_first = ref_tokens[0]
    ref.reset_cache()
    _sequence(ref, patches, prompt_ids)
    ref_decode = _teacher_forced(ref, ref_tokens[:-1], n)

    own_tmp = work_dir is None
    work_dir = work_dir or tempfile.mkdtemp(prefix="bluelower-eval-quant-")
    rows = []
    try:
        for mode in modes:
            out = os.path.join(work_dir, f"{cfg.name}-{mode}")
            t0 = time.perf_counter()
            manifest = compile_model(CompileRequest(model=model, out_dir=out, quant=mode, seed=seed, group_size=group_size,
                                                    disabled_passes=tuple(disabled_passes)))
            compile_s = time.perf_counter() - t0
            built = CompiledModel(out)
            image, prefill, _ = _sequence(built, patches, prompt_ids)
            greedy = _greedy(built, prefill, n, tokens)
            built.reset_cache()
            _sequence(built, patches, prompt_ids)
            decode = _teacher_forced(built, ref_tokens[:-1], n)
            deq = check_reference(out)
            deq.reset_cache()
            _sequence(deq, patches, prompt_ids)
            deq_decode = _teacher_forced(deq, ref_tokens[:-1], n)
            prefix = next((i for i, (a, b) in enumerate(zip(greedy, ref_tokens)) if a != b), len(ref_tokens))
            top1 = [int(np.argmax(d[0])) == t for d, t in zip(decode, ref_tokens[1:])]
            top1.insert(0, int(np.argmax(prefill[0])) == ref_first)
            rows.append({
                "mode": mode,
                "image_tokens_rel_err": _rel(image, ref_image),
                "prefill_logits_rel_err": _rel(prefill, ref_prefill),
                "decode_logits_rel_err": float(np.mean([_rel(a, b) for a, b in zip(decode, ref_decode)])),
                "teacher_forced_top1": float(np.mean(top1)),
                "greedy_prefix": int(prefix),
                "greedy_tokens": len(ref_tokens),
                "kernel_rel_err": float(np.max([_rel(a, b) for a, b in zip(decode, deq_decode)])),
                "weights_bytes": int(manifest.get("quantization", {}).get("weights_bytes", 0)),
                "decode_weights_bytes_per_call": int(manifest["functions"]["decode"].get("weights_bytes_per_call", 0)),
                "compile_s": round(compile_s, 1),
            })
            progress.log(f"eval-quant {cfg.name} {mode}: " + json.dumps({k: v for k, v in rows[-1].items() if k != "mode"}))
    finally:
        if own_tmp:
            shutil.rmtree(work_dir, ignore_errors=True)
    return {"model": cfg.name, "seed": seed, "group_size": group_size, "tokens": len(ref_tokens),
            "prompt_ids": list(prompt_ids), "reference_tokens": ref_tokens, "results": rows,
            "code_fingerprint": fingerprint}


# ---------------------------------------------------------------- report


def format_table(report: dict) -> str:
    head = ("| mode | image tokens rel. err | prefill logits rel. err | decode logits rel. err (teacher-forced, mean) "
            "| top-1 agreement (teacher-forced) | greedy: identical leading tokens | kernel vs dequantized PyTorch "
            "| stored weights | decode reads / call |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in report["results"]:
        lines.append(
            f"| {r['mode']} | {r['image_tokens_rel_err']:.2e} | {r['prefill_logits_rel_err']:.2e} "
            f"| {r['decode_logits_rel_err']:.2e} | {100 * r['teacher_forced_top1']:.1f}% "
            f"| {r['greedy_prefix']} / {r['greedy_tokens']} | {r['kernel_rel_err']:.1e} "
            f"| {r['weights_bytes'] / 1e6:.2f} MB | {r['decode_weights_bytes_per_call'] / 1e6:.2f} MB |"
        )
    return "\n".join(lines)


def write_doc(path: str, reports: list, command: str | None = None) -> None:
    """The random-weight accuracy tables of ``evaluate`` reports, as the ``random-weights``
    section of ``path`` (docs/quantization.md; the text around it is written by hand)."""
    from .eval_text import write_section

    if command is None:
        models = " ".join(f"--model {r['model']}" for r in reports)
        command = f"bluelower eval-quant {models} --write-doc {os.path.relpath(path)}"
    body = "\n\n".join(f"### `{r['model']}` (seed {r['seed']}, group size {r['group_size']}, {r['tokens']} tokens)\n\n"
                       + format_table(r) for r in reports)
    prints = {r.get("code_fingerprint") for r in reports}
    write_section(path, "random-weights", body, command, fingerprint=prints.pop() if len(prints) == 1 else None)
