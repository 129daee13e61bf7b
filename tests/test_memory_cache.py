"""inspect memory --model: the on-disk result cache (hit without importing, misses on any
input or source change, corrupt entries recomputed, BLUELOWER_CACHE_DIR=off)."""

import json
import os

import pytest

from bluelower import memory


def _no_import(*_a, **_k):
    raise AssertionError("imported although the result was cached")


def test_second_call_is_served_from_the_cache(tmp_path, monkeypatch):
    import bluelower.lowering.importer as importer

    monkeypatch.setenv("BLUELOWER_CACHE_DIR", str(tmp_path))
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
    monkeypatch.setattr(memory, "_sources_digest", lambda: "edited")
    with pytest.raises(AssertionError, match="imported although"):
        memory.inspect_model("tiny", soc="host", quant="w4a16kv8")


def test_corrupt_entry_is_recomputed_and_off_disables(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUELOWER_CACHE_DIR", str(tmp_path))
    first = memory.inspect_model("tiny", soc="host", quant="fp32")
    (path,) = list((tmp_path / "inspect-memory").iterdir())
    path.write_text("{not json")
    again = memory.inspect_model("tiny", soc="host", quant="fp32")
    assert again["peak_bytes"] == first["peak_bytes"]
    assert json.loads(path.read_text())["peak_bytes"] == first["peak_bytes"]  # rewritten
    monkeypatch.setenv("BLUELOWER_CACHE_DIR", "off")
    assert memory.cache_dir() is None
    os.unlink(path)
    memory.inspect_model("tiny", soc="host", quant="fp32")
    assert not path.exists()
