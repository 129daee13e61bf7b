"""Where a compile's model comes from: its config, its weights and its tokenizer.

* ``--model NAME|PATH.json`` (+ ``--weights W.safetensors`` in the module's own names, or
  seeded random weights): bluelower's configs;
* ``--hf DIR``: a Hugging Face directory (``config.json``, one or many safetensors shards in
  fp32/fp16/bf16, tokenizer files);
* ``--gguf FILE``: a llama.cpp GGUF file (F32/F16/Q8_0/Q4_0/Q4_1 tensors, LLaMA-family
  metadata, its own vocabulary and chat template).

For a checkpoint the family is the one whose ModelSpec lists the config's architecture,
the config is the family's ``from_hf_config``, and weights are streamed tensor by tensor
through the family's ``checkpoint_name`` map; a missing, extra or misshaped tensor is one
error naming it, before anything is traced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ...errors import BlueLowerError
from ..models import registry


@dataclass
class TokenizerInfo:
    """What a build ships of the checkpoint's tokenizer (``tokenizer.json`` + the manifest)."""

    json_text: str
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: list
    image_token: str | None = None  # the placeholder the chat template writes for an image
    image_wrap: tuple = ("", "")  # the text around the image's rows (the checkpoint's processor)

    def manifest(self) -> dict:
        return {"file": "tokenizer.json", "chat_template": self.chat_template, "bos_token_id": self.bos_token_id,
                "eos_token_ids": list(self.eos_token_ids), "image_token": self.image_token,
                "image_wrap": list(self.image_wrap)}


class CheckpointWeights:
    """A checkpoint's tensors under the module's weight names (``spec.checkpoint_name``)."""

    def __init__(self, ckpt, spec, cfg, expected: dict):
        self.ckpt, self.path = ckpt, ckpt.path
        rename = (lambda n: spec.checkpoint_name(n, cfg)) if spec.checkpoint_name else (lambda n: n)
        self.source_of: dict = {}
        extra = []
        for name in ckpt.names():
            ours = rename(name)
            if ours is None:
                continue
            if ours not in expected:
                extra.append(name)
                continue
            self.source_of[ours] = name
        if extra:
            more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
            raise BlueLowerError(f"{ckpt.path}: tensor(s) {', '.join(extra[:3])}{more} are not weights of a "
                                 f"{spec.family} model with this config")
        missing = sorted(set(expected) - set(self.source_of))
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise BlueLowerError(f"{ckpt.path}: missing weight(s) {', '.join(missing[:3])}{more}")
        for ours, (shape, _dtype) in expected.items():
            got = tuple(ckpt.shape(self.source_of[ours]))
            if got != tuple(shape):
                raise BlueLowerError(f"{ckpt.path}: tensor '{self.source_of[ours]}' has shape {list(got)}, "
                                     f"the model expects {list(shape)}")
        from .checkpoints import GGUFCheckpoint
        from .weights import check_weight_dtypes

        self.gguf = isinstance(ckpt, GGUFCheckpoint)
        if not self.gguf:  # safetensors shards (a GGUF's own types are checked when it is opened)
            check_weight_dtypes(ckpt.path, {src: ckpt.source_dtype(src) for src in self.source_of.values()})

    def read(self, name: str) -> np.ndarray:
        from .weights import check_finite

        src = self.source_of[name]
        arr = self.ckpt.read(src)  # safetensors: checked as it is read
        return check_finite(arr, self.ckpt.path, src) if self.gguf else arr

    def check_against(self, expected: dict) -> None:
        """Checked when the source was opened (every weight of ``expected`` present, shaped)."""

    def read_quantized(self, name: str):
        from .weights import check_finite

        q = self.ckpt.read_quantized(self.source_of[name])
        if q is not None:  # the file's own scales (and offsets) must be finite too
            for part in (q.scales, q.mins):
                if part is not None:
                    check_finite(np.asarray(part, dtype=np.float32), self.ckpt.path, self.source_of[name])
        return q

    def source_dtype(self, name: str) -> str:
        return self.ckpt.source_dtype(self.source_of[name])

    def sha256(self) -> str:
        return self.ckpt.sha256()


@dataclass
class ModelSource:
    cfg: object
    weights: object | None  # .read(name) -> array, .sha256(), .path; None: seeded random weights
    tokenizer: TokenizerInfo | None = None
    checkpoint_kind: str | None = None  # "hf" | "gguf" | None


def _family_of(hf: dict, path: str):
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    by_arch = {a: spec for spec in registry.families().values() for a in spec.hf_architectures}
    for arch in archs:
        if arch in by_arch:
            return by_arch[arch]
    known = ", ".join(sorted(by_arch)) or "none"
    raise BlueLowerError(f"{path}: unknown architecture {archs or hf.get('model_type', '?')} "
                         f"(supported: {known})")


def checkpoint_source(path: str, name: str | None = None, **runtime) -> ModelSource:
    """The model in a Hugging Face directory or a GGUF file. ``runtime``: overrides of the
    compiled shapes (``kv_capacity``, ``prefill_chunk``, ``image_batch``)."""
    from .checkpoints import GGUFCheckpoint, open_checkpoint
    from .weights import model_weight_specs

    ckpt = open_checkpoint(path)
    spec = _family_of(ckpt.config, path)
    label = name or os.path.basename(os.path.normpath(path)).removesuffix(".gguf")
    overrides = {k: v for k, v in runtime.items() if v is not None}
    cfg = spec.from_hf_config(ckpt.config, label, **overrides)
    weights = CheckpointWeights(ckpt, spec, cfg, model_weight_specs(cfg))
    tokenizer = None
    text = ckpt.tokenizer_json()
    if text is not None:
        special = ckpt.special_tokens
        tokenizer = TokenizerInfo(text, ckpt.chat_template, special.get("bos_token_id"),
                                  list(special.get("eos_token_ids") or []),
                                  image_token=spec.image_token, image_wrap=tuple(spec.image_wrap))
        # every EOS the checkpoint names ends generation (chat models: the end-of-turn token)
        known = set(cfg.stop_ids)
        more = [i for i in tokenizer.eos_token_ids if i not in known and 0 <= i < cfg.decoder.vocab_size]
        if more:
            cfg = cfg.replace_runtime(stop_token_ids=tuple(cfg.runtime.stop_token_ids) + tuple(more))
    kind = "gguf" if isinstance(ckpt, GGUFCheckpoint) else "hf"
    return ModelSource(cfg, weights, tokenizer, kind)


def config_source(model, weights: str | None = None) -> ModelSource:
    """A bluelower config (shipped name, JSON path or config object) and optional weights in
    the module's own names."""
    from ..models import load_config
    from .weights import WeightSource, model_weight_specs

    cfg = load_config(model)
    source = None
    if weights:
        source = WeightSource(weights)
        source.check_against(model_weight_specs(cfg))
    return ModelSource(cfg, source)


class ModuleWeights:
    """An ``nn.Module``'s own parameters as a weight source (fp32, by parameter name)."""

    def __init__(self, module):
        self.module, self.path = module, None
        self._params = dict(module.named_parameters())

    def read(self, name: str) -> np.ndarray:
        return self._params[name].detach().to("cpu").float().numpy().copy()

    def sha256(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for name in sorted(self._params):
            h.update(name.encode() + b"\0" + self.read(name).tobytes())
        return h.hexdigest()


def module_source(module, entries: dict, name: str | None = None, roles=None) -> ModelSource:
    """A user's ``torch.nn.Module`` as a one-off model family: ``entries`` maps a method of
    the module (``forward``, ``prefill``, ...) to its example inputs; each becomes a compiled
    function of that name taking the inputs' shapes and dtypes (static) and the module's
    weights. ``roles``: the weights' roles (a dict or a function; default: every linear weight
    a decoder linear, every lookup table a token embedding). The module is traced on meta
    tensors; its weights are read from it when the parameters are written."""
    import hashlib
    import inspect

    from ..models import registry
    from ..models.config import ModelConfig
    from ..models.spec import EntrySpec, ModelSpec

    if not entries:
        raise BlueLowerError("compile_module: give at least one entry (method name -> example inputs)")
    specs = []
    for method, inputs in entries.items():
        fn = getattr(module, method, None)
        if not callable(fn):
            raise BlueLowerError(f"compile_module: {type(module).__name__} has no method {method!r}")
        inputs = tuple(inputs)
        try:
            params = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            names = tuple(p.name for p in params[: len(inputs)])
        except (TypeError, ValueError):
            names = ()
        if len(names) != len(inputs):
            names = tuple(f"input{i}" for i in range(len(inputs)))

        def example(_cfg, device="cpu", _inputs=inputs):
            return tuple(t.to(device) for t in _inputs)

        specs.append(EntrySpec(method, names, example, lambda _name: True))
    if callable(roles):
        role = roles
    elif roles:
        role = lambda n, _r=dict(roles): _r.get(n, "other")  # noqa: E731
    else:
        role = lambda _n: "mlp"  # noqa: E731
    shapes = sorted((n, tuple(p.shape)) for n, p in module.named_parameters())
    signature = [(m, [(tuple(t.shape), str(t.dtype)) for t in inputs]) for m, inputs in sorted(entries.items())]
    digest = hashlib.sha256(repr((type(module).__qualname__, shapes, signature)).encode()).hexdigest()[:12]
    family = f"module-{digest}"
    spec = ModelSpec(family=family, description=f"a user's {type(module).__name__}", config_from_dict=None,
                     config_dir="", build_module=lambda _cfg, _m=module: _m, entries=tuple(specs), weight_role=role,
                     kv_cache_shape=lambda _cfg: None)
    registry.register(spec, replace=True)  # this module instance: its code and example inputs
    cfg = ModelConfig(name=name or type(module).__name__, family=family, vision=None, projector=None, decoder=None)
    return ModelSource(cfg, ModuleWeights(module))
