"""api.compile_module: a user's own nn.Module (not a registered family) through the same
pipeline: outputs equal PyTorch's, attention written with scaled_dot_product_attention is
fused, --quant puts its linear layers in INT4/INT8 kernels by role."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bluelower import api
from bluelower.errors import BlueLowerError
from bluelower.runtime_stubs.generate import CompiledModel


class Block(nn.Module):
    """A pre-norm transformer block written as a user would, with SDPA."""

    def __init__(self, width=64, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 128), nn.GELU(), nn.Linear(128, width))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(x)


@pytest.fixture(scope="module")
def block_and_build(tmp_path_factory):
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(1, 16, 64)
    out = str(tmp_path_factory.mktemp("module") / "build")
    manifest = api.compile_module(block, (x,), out, quant="fp32")
    return block, x, out, manifest


def test_outputs_equal_pytorch(block_and_build):
    block, x, out, _ = block_and_build
    with torch.no_grad():
        want = block(x).numpy()
    got = CompiledModel(out).call("forward", x.numpy()).numpy()
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())


def test_sdpa_attention_is_fused(block_and_build):
    *_, manifest = block_and_build
    fused = next(p["stats"] for p in manifest["passes"] if p["name"] == "FuseAttention")
    assert fused["per_function"] == {"forward": 1}


def test_quantized_module_uses_the_int_kernels(tmp_path):
    torch.manual_seed(1)
    block = Block().eval()
    x = torch.randn(1, 16, 64)
    roles = {"mlp.0.weight": "mlp", "mlp.2.weight": "mlp", "qkv.weight": "attention", "out.weight": "vision"}
    manifest = api.compile_module(block, {"forward": (x,)}, str(tmp_path / "q"), quant="w4a16", roles=roles)
    stats = next(p["stats"] for p in manifest["passes"] if p["name"] == "QuantizeWeights")
    # the default recipe: INT4 asymmetric g32 for mlp / attention; out.weight: a "vision" role is INT8
    assert stats["int4_asym_layers"] == 3 and stats["int8_layers"] == 1
    with torch.no_grad():
        want = block(x).numpy()
    got = CompiledModel(str(tmp_path / "q")).call("forward", x.numpy()).numpy()
    assert float(np.abs(got - want).max()) <= 0.1 * float(np.abs(want).max())  # 4-bit weights


def test_a_method_the_module_lacks_is_one_line(tmp_path):
    with pytest.raises(BlueLowerError, match="has no method 'prefill'"):
        api.compile_module(Block(), {"prefill": (torch.randn(1, 4, 64),)}, str(tmp_path / "x"))
