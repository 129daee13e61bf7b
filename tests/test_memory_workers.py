"""inspect memory --model plans each entry function in its own worker process: the result
is the one a single process computes; bad job counts are one-line errors."""

import json

import pytest
from click.testing import CliRunner

from bluelower.reports import memory
from bluelower.cli import cli
from bluelower.errors import BlueLowerError
from bluelower.lowering.models import load_config


def test_workers_plan_what_one_process_plans(monkeypatch):
    """tiny on dimensity9300 (APU partitions, TileImagePatches' stages): byte-identical JSON."""
    monkeypatch.setenv("BLUELOWER_CACHE", "off")
    one = memory.inspect_model("tiny", soc="dimensity9300", quant="w4a16kv8", image_grid="2x2", jobs=1)
    workers = memory.inspect_model("tiny", soc="dimensity9300", quant="w4a16kv8", image_grid="2x2", jobs=2)
    assert json.dumps(workers) == json.dumps(one)
    assert {"encode_image_blocks", "prefill", "decode", "embed"} <= set(workers["functions"])


def test_job_count_defaults_and_errors(monkeypatch):
    monkeypatch.delenv("BLUELOWER_JOBS", raising=False)
    assert memory.plan_jobs(None, load_config("tiny")) == 1  # small: starting workers costs more
    assert memory.plan_jobs(3, load_config("tiny")) == 3
    monkeypatch.setenv("BLUELOWER_JOBS", "1")
    assert memory.plan_jobs(None, load_config("bluelm-v-3b")) == 1
    monkeypatch.setenv("BLUELOWER_JOBS", "two")
    with pytest.raises(BlueLowerError, match="BLUELOWER_JOBS must be a whole number"):
        memory.plan_jobs(None, load_config("tiny"))
    monkeypatch.setenv("BLUELOWER_JOBS", "0")
    with pytest.raises(BlueLowerError, match="BLUELOWER_JOBS must be at least 1"):
        memory.plan_jobs(None, load_config("tiny"))
    with pytest.raises(BlueLowerError, match="at least 1"):
        memory.plan_jobs(0)


def test_cli_rejects_zero_jobs():
    res = CliRunner().invoke(cli, ["--quiet", "inspect", "memory", "--model", "tiny", "--jobs", "0"])
    assert res.exit_code != 0
    assert res.output.strip() == "error: --jobs must be at least 1, got 0"
