"""inspect memory --model: the on-disk result cache (hit without importing, misses on any
input or source change, corrupt entries recomputed, BLUELOWER_CACHE=off)."""

import json
import os

import pytest

from bluelower.reports import memory


def _no_import(*_a, **_k):
    raise AssertionError("imported although the result was cached")


def test_second_call_is_served_from_the_cache(tmp_path, monkeypatch):
    import bluelower.lowering.frontend.importer as importer

    monkeypatch.setenv("BLUELOWER_CACHE", str(tmp_path))
    first = memory.inspect_model("tiny", soc="host", quant="w4a16kv8")
    files = list((tmp_path / "inspect-memory").iterdir())
    assert len(files) == 1
    monkeypatch.setattr(importer, "import_model", _no_import)
    again = memory.inspect_model("tiny", soc="host", quant="w4a16kv8")
    assert again == json.loads(json.dumps(first))
    # another input is another key: it must compute (and so import)
    with pytest.raises(AssertionError, match="imported although"):
        memory.inspect_model("tiny", soc="host", quant="w8")
    # a source change is another key too
    monkeypatch.setattr(memory, "sources_digest", lambda: "edited")
    with pytest.raises(AssertionError, match="imported although"):
        memory.inspect_model("tiny", soc="host", quant="w4a16kv8")


def test_corrupt_entry_is_recomputed_and_off_disables(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUELOWER_CACHE", str(tmp_path))
    first = memory.inspect_model("tiny", soc="host", quant="fp32")
    (path,) = list((tmp_path / "inspect-memory").iterdir())
    path.write_text("{not json")
    again = memory.inspect_model("tiny", soc="host", quant="fp32")
    assert again["peak_bytes"] == first["peak_bytes"]
    assert json.loads(path.read_text())["peak_bytes"] == first["peak_bytes"]  # rewritten
    monkeypatch.setenv("BLUELOWER_CACHE", "off")
    assert memory.result_dir("inspect-memory") is None
    os.unlink(path)
    memory.inspect_model("tiny", soc="host", quant="fp32")
    assert not path.exists()


def test_fast_frame_capture_parses_the_same_pipeline():
    """The pass pipeline with parse_speed's frame capture gives the same module (tiny, w4a16kv8)."""
    import tvm

    from bluelower.lowering.frontend.importer import import_model
    from bluelower.lowering.kernels.parse_speed import fast_prim_func_frames
    from bluelower.lowering.models import load_config, spec_for
    from bluelower.passes.pipeline import BuildContext, resolve
    from bluelower.passes.quantize_weights import _int4_linear, _int8_linear, _embedding_gather

    cfg = load_config("tiny")
    outs = []
    for fast in (False, True):
        for cached in (_int4_linear, _int8_linear, _embedding_gather):
            cached.cache_clear()  # parse every kernel again in this mode
        mod, sigs = import_model(cfg, "torch")
        ctx = BuildContext(target=tvm.target.Target("llvm"), quant="w4a16kv8", spec=spec_for(cfg),
                           entry_functions=tuple(sigs))
        for spec, p, _why in resolve(ctx):
            if spec.name == "LegalizeOps":
                break
            if p is not None:
                with tvm.transform.PassContext(opt_level=3):
                    if fast:
                        with fast_prim_func_frames():
                            mod = p(mod)
                    else:
                        mod = p(mod)
        outs.append(mod)
    tvm.ir.assert_structural_equal(outs[0], outs[1])
    from tvm.tirx.script.parser import entry
    import inspect
    assert entry.inspect is inspect  # restored


def test_native_soc_is_cached_under_its_cpu(tmp_path, monkeypatch):
    """``--soc native`` (host.toml + this CPU's mcpu) plans and caches like a shipped SoC (it
    failed with "unknown SoC 'native': use one of ..., native"); its key is not host's."""
    import bluelower.lowering.frontend.importer as importer

    monkeypatch.setenv("BLUELOWER_CACHE", str(tmp_path))
    native = memory.inspect_model("tiny", soc="native", quant="fp32")
    host = memory.inspect_model("tiny", soc="host", quant="fp32")
    assert native["peak_bytes"] == host["peak_bytes"] > 0  # same plan: only the CPU's ISA differs
    assert len(list((tmp_path / "inspect-memory").iterdir())) == 2
    monkeypatch.setattr(importer, "import_model", _no_import)
    assert memory.inspect_model("tiny", soc="native", quant="fp32") == json.loads(json.dumps(native))


def test_a_changed_soc_field_is_another_key(tmp_path, monkeypatch):
    """The key digests the SoC as loaded: the same file content is a hit, a changed field a miss."""
    from bluelower.targets.soc import soc_path

    monkeypatch.setenv("BLUELOWER_CACHE", str(tmp_path / "cache"))
    text = open(soc_path("host"), encoding="utf-8").read()
    changed = text.replace('per_call_overhead = "20 us"', 'per_call_overhead = "30 us"')
    assert changed != text
    soc = tmp_path / "my-soc.toml"  # one path: only the content changes
    soc.write_text(text)
    memory.inspect_model("tiny", soc=str(soc), quant="fp32")
    memory.inspect_model("tiny", soc=str(soc), quant="fp32")
    assert len(list((tmp_path / "cache" / "inspect-memory").iterdir())) == 1
    soc.write_text(changed)
    memory.inspect_model("tiny", soc=str(soc), quant="fp32")
    assert len(list((tmp_path / "cache" / "inspect-memory").iterdir())) == 2
