"""python -m sals demo's table on a tiny model (fast; tests/hf/test_smollm2.py runs the demo on
SmolLM2): each cache is compared with dense K+V of its own element width."""

from __future__ import annotations

import sals.hf
import tiny
import torch
from sals.tools import demo


def test_ratios_compare_like_with_like():
    """Dense runs in the model's float32 on the CPU; SALS stores 16-bit. The dense row is its
    own reference (1.00x, not its float32 bytes against fp16, 0.50x) and a SALS row is measured
    against dense fp16 K+V for its tokens."""
    model = tiny.model("llama")
    ids = tiny.prompt(24)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense = demo.run(model, enc, 4)
    sals.hf.patch(model, preset="dense-equivalent")  # float16 storage, the default
    try:
        full = demo.run(model, enc, 4)
    finally:
        sals.hf.unpatch(model)
    # the same tokens in both: dense float32 K+V are twice what the fp16 reference counts
    assert dense["kv_bytes"] == dense["dense_bytes"] == 2 * full["dense_bytes"]
    table = demo._table([("dense", dense), ("SALS", full)], ["a", "b"], model.dtype, 1.0)
    rows = {line.split()[0]: line for line in table.splitlines()
            if line.startswith(("dense ", "SALS "))}
    assert rows["dense"].split()[3] == "1.00x", table
    assert rows["SALS"].split()[3] == f"{full['dense_bytes'] / full['kv_bytes']:.2f}x", table
    assert "dense against its own float32 K+V, SALS against dense fp16 K+V" in table
