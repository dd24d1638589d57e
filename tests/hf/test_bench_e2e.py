"""``python -m sals bench e2e --max-batch-context`` on the CPU at tiny sizes, through the command
line (in process, with the session's SmolLM2: ``loading.load`` returns it): each setting is timed
at the largest batch its cache leaves room for in the memory budget, prompts prefilled one
sequence at a time; a budget below the weights is reported as no batch fitting. SALS rows take
``--dense-kv exact`` and ``--compile``."""

from __future__ import annotations

import json

import pytest
import sals.hf
from sals import __main__ as cli
from sals.tools.graph_decoder import DenseGraphDecoder, fused_weight_bytes

pytestmark = pytest.mark.slow

S, NEW = 256, 3


def _bench(tmp_path, settings: str, memory_bytes: float) -> list[dict]:
    out = tmp_path / f"{settings}.json"
    code = cli.main(["bench", "e2e", "--model", "smollm2", "--settings", settings,
                     "--contexts", "8", "--batches", "1", "--new-tokens", str(NEW),
                     "--max-batch-context", str(S), "--memory-gib", str(memory_bytes / 2**30),
                     "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())["rows"]


@pytest.fixture()
def session_model(smollm2, smollm2_calibration, monkeypatch):
    """The CLI's model loading returns the session's model (its calibration is cached)."""
    from sals.hf import loading

    monkeypatch.setattr(loading, "load", lambda *args, **kwargs: smollm2)
    yield smollm2[0]
    if sals.hf.is_patched(smollm2[0]):
        sals.hf.unpatch(smollm2[0])


def _largest(rows: list[dict], setting: str) -> dict:
    (row,) = [r for r in rows if r.get("largest_batch") and r["setting"] == setting]
    return row


def test_dense_graph_at_the_largest_batch(session_model, tmp_path):
    model = session_model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_seq = DenseGraphDecoder(model, 1, S + NEW).cache_bytes
    room = 3 * per_seq  # about three sequences' K/V, less one prompt's activations
    rows = _bench(tmp_path, "dense-graph", weights + fused_weight_bytes(model) + room)
    assert [r["context"] for r in rows] == [8, S] and "error" not in rows[0]
    row = _largest(rows, "dense-graph")
    assert "error" not in row, row
    assert row["batch"] >= 2 and row["batch"] * per_seq <= room  # the caches decide
    assert row["tried"] == [row["batch"]] and row["prefill_rows"] == 1
    assert row["tokens_per_s"] > 0 and row["ttft_ms"] > 0


def test_sals_at_the_largest_batch(session_model, smollm2_calibration, tmp_path):
    """SALS-12.5%: a sequence's cache is what a cache of two sequences allocates beyond one of
    one; the prompts are prefilled one at a time and generate decodes the whole batch."""
    model = session_model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    sals.hf.patch(model, calibration=smollm2_calibration, preset="sals-12.5")
    sizes = [sals.hf.SalsCache(model, n, S + NEW).memory()["allocated"] for n in (1, 2)]
    sals.hf.unpatch(model)
    per_seq = sizes[1] - sizes[0]
    # about four sequences, the cache's fixed part and one prompt's activations
    room = 4 * per_seq + sizes[0] + 8 * 2**20
    rows = _bench(tmp_path, "sals-12.5", weights + room)
    row = _largest(rows, "sals-12.5")
    assert "error" not in row, row
    assert row["batch"] >= 2 and row["batch"] * per_seq <= room
    assert row["tried"] == [row["batch"]] and row["prefill_rows"] == 1
    assert row["tokens_per_s"] > 0 and row["sals_cache_bytes"] > 0


def test_a_budget_below_the_weights_fits_no_batch(session_model, tmp_path):
    rows = _bench(tmp_path, "dense-graph,sals-12.5", 2**26)
    for setting in ("dense-graph", "sals-12.5"):
        row = _largest(rows, setting)
        assert row["batch"] == 0 and row["tried"] == []
        assert row["error"] == "no batch fits 0.06 GiB", row


def test_sals_rows_with_exact_dense_layers_and_a_compiled_step(session_model, tmp_path):
    """--dense-kv exact --compile: the SALS row is patched with both (recorded in the row and
    the run's meta), decodes through the compiled step, and its cache bytes count the exact
    layers' static K/V."""
    out = tmp_path / "exact.json"
    code = cli.main(["bench", "e2e", "--model", "smollm2", "--settings", "sals-12.5",
                     "--contexts", "8", "--batches", "2", "--new-tokens", str(NEW),
                     "--dense-kv", "exact", "--compile", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["meta"]["dense_kv"] == "exact" and result["meta"]["compile"] is True
    (row,) = result["rows"]
    assert row["dense_kv"] == "exact" and row["compile"] is True and "error" not in row
    assert row["exact_attention"] == "default"  # the CPU: torch's own choice
    assert row["tokens_per_s"] > 0
    # SmolLM2's dense layers 0, 1, 29: K and V of 2 rows x 3 KV heads x (8 + NEW - 1) slots x
    # 64 in float32, and the slot masks
    slots = 8 + NEW - 1
    exact = 3 * (2 * 2 * 3 * slots * 64 * 4 + 2 * slots)
    assert row["sals_cache_bytes"] > exact
    assert row["peak_memory_bytes"] == row["sals_cache_bytes"]  # the CPU: the caches only


def test_sals_graph_row_runs_the_decode_loop(session_model, tmp_path):
    """sals-12.5-graph: SalsGraphDecoder over the patched model (its dense layers exact with
    --dense-kv exact), beside dense-graph in the same loop (compiled steps:
    test_graph_decoder.py)."""
    out = tmp_path / "graph.json"
    code = cli.main(["bench", "e2e", "--model", "smollm2", "--settings",
                     "dense-graph,sals-12.5-graph", "--contexts", "8", "--batches", "2",
                     "--new-tokens", str(NEW), "--dense-kv", "exact", "--out", str(out)])
    assert code == 0
    dense, sparse = json.loads(out.read_text())["rows"]
    assert dense["attention"] == "default" and sparse["attention"] == "sals"
    assert sparse["dense_kv"] == "exact" and "error" not in sparse
    assert dense["compile"] is False and sparse["compile"] is False
    assert sparse["fused_weight_bytes"] == dense["fused_weight_bytes"] > 0
    assert sparse["tokens_per_s"] > 0 and sparse["peak_memory_bytes"] == sparse["sals_cache_bytes"]
