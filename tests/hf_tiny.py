"""Tiny random transformers models exported as users export them: ``torch.export`` of a
static-shape forward (no KV cache), shared by the op-support and attention-pattern tests."""

from __future__ import annotations

import torch

SEQ = 8  # tokens of the text models' forward
IMAGE, PATCH = 32, 8  # SigLIP: a 4 x 4 patch grid


def hf_model(arch: str, attn: str = "eager", kv_heads: int = 2, layers: int = 2, **extra):
    """``(module, example inputs)``: a forward returning the logits (text) or the last hidden
    state and the pooling head's output (SigLIP: its attention too) of a transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` /
    ``SiglipVisionModel`` with random weights and ``attn_implementation=attn``."""
    import transformers

    torch.manual_seed(0)
    if arch in ("llama", "qwen2"):
        config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
        cfg = config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         attn_implementation=attn, **extra)
        model = model_cls(cfg).eval()

        class TextForward(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, input_ids):
                return self.m(input_ids=input_ids, use_cache=False).logits

        return TextForward(), (torch.randint(0, 128, (1, SEQ)),)
    if arch == "siglip":
        cfg = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                              num_attention_heads=4, image_size=IMAGE, patch_size=PATCH,
                                              attn_implementation=attn, **extra)
        model = transformers.SiglipVisionModel(cfg).eval()

        class VisionForward(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, pixel_values):
                out = self.m(pixel_values=pixel_values)
                return out.last_hidden_state, out.pooler_output

        return VisionForward(), (torch.randn(1, 3, IMAGE, IMAGE),)
    raise KeyError(arch)


def export(module: torch.nn.Module, inputs: tuple):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module.eval(), inputs)
