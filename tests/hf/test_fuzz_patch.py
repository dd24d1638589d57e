"""Property-based options of ``sals.hf.patch`` and its auto preset, on tiny random models
(tests/hf/tiny.py: Llama, and Gemma 3 with sliding-window layers), in the manner of
tests/python/test_fuzz_inputs.py.

Each example draws a random set of keywords (the patch's own, ``sals.Config`` fields, the
auto preset's ``kv_fraction`` / ``kv_context``, unknown and reserved names), each either right,
of the wrong kind (47.9 tokens, "0.3", True for a count, None) or of the right kind and out of
range, and the calibration as an object, a path, None, junk, a corrupt file or one made for
another model. The property:

- a valid set patches (``is_patched``), ``generate`` runs through the SALS cache, and
  ``unpatch`` gives back the model's own logits bit for bit;
- an invalid set raises one of sals's own errors naming a broken option (or the file), and the
  model is left as it was: unpatched, its logits unchanged bit for bit;
- nothing else: no TypeError, no crash.

An out-of-range ``sals.Config`` value (``n_sink=-1``) is refused by ``patch`` itself, naming
the field, not when the first cache is made.

Examples: SALS_FUZZ_EXAMPLES (default 100; a few seconds on two cores, with torch on one
thread for the module: the tiny models gain nothing from a second one), derandomized.
"""

from __future__ import annotations

import os
import pathlib
import re
import tempfile

import numpy as np
import pytest
import sals
import sals.hf
import tiny
import torch
from sals.hf import calibrate

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import event, given
from hypothesis import strategies as st
from fuzz import FUZZ


_TMP = tempfile.TemporaryDirectory(prefix="sals-fuzz-patch-")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models' matmuls gain nothing from threads, and on a busy two-core machine
    torch's second thread makes every one of them wait: one thread, put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
_MODELS: dict = {}


def setup(family: str) -> dict:
    """The tiny model of `family`, loaded once: its unpatched logits, a full-rank calibration
    (object and file), one made for another model and a corrupt file."""
    if family not in _MODELS:
        model = tiny.model(family)
        ids = tiny.prompt(6)
        info = sals.hf._arch.describe(model)
        cal = sals.Calibrator([layer.dk for layer in info.layers])
        calibrate.collect_keys(model, [tiny.prompt(48, seed=7 + i) for i in range(2)], cal,
                               progress=False)
        fp = sals.hf.fingerprint(model)
        good = cal.finish(rank_frac=1.0, fingerprint=fp, data="random")
        path = os.path.join(_TMP.name, f"{family}.salscal")
        good.save(path)
        other = sals.Calibration(good.layers, {**fp, "model_type": "other"}, "random")
        corrupt = os.path.join(_TMP.name, f"{family}-corrupt.salscal")
        with open(path, "rb") as f, open(corrupt, "wb") as g:
            g.write(f.read()[:-20])
        _MODELS[family] = {"model": model, "ids": ids, "ref": tiny.logits(model, ids),
                           "calib": good, "path": path, "other": other, "corrupt": corrupt,
                           "n_layers": len(info.layers), "family": family}
    return _MODELS[family]


# ---- option values: (value, verdict), verdict "ok", "type" (wrong kind), "range" --------------

def ints(lo, hi):
    return st.one_of(st.integers(lo, hi), st.integers(lo, hi).map(np.int64))


TYPE_JUNK = st.sampled_from([1.5, 47.9, True, False, "4", None, [1], 1j, b"1", np.float32(2.0)])
REAL_JUNK = st.sampled_from(["0.3", True, None, [0.5], 1j, b"0.5", np.bool_(True)])
BOOL_JUNK = st.sampled_from([0, 1, "yes", "False", None, 1.0])


CONFIG_FIELDS = {
    # field: (right values, wrong kinds, right kind out of range)
    "n_sink": (ints(0, 8), TYPE_JUNK, st.sampled_from([-1, -5])),
    "n_recent": (ints(0, 8), TYPE_JUNK, st.sampled_from([-1, -7])),
    "budget_frac": (st.one_of(st.floats(0.05, 1.0), st.just(1), st.just(np.float32(0.5))),
                    REAL_JUNK, st.sampled_from([0.0, -0.5, 1.5, float("nan"), float("inf")])),
    "budget_tokens": (ints(0, 8), TYPE_JUNK, st.sampled_from([-1])),
    "value_bits": (st.sampled_from([16, 8, 4, 2]), TYPE_JUNK, st.sampled_from([3, 0, 32])),
    "dtype": (st.sampled_from(["float32", "float16", "bfloat16"]),
              st.sampled_from([None, 16, b"float16", "float64", "int8", "Float16"]), None),
    "check_finite": (st.sampled_from([True, False, np.bool_(True)]), BOOL_JUNK, None),
    "select_per_head": (st.sampled_from([True, False]), BOOL_JUNK, None),
    "dense": (st.sampled_from([True, False]), BOOL_JUNK, None),
    "n_threads": (ints(0, 2), TYPE_JUNK, st.sampled_from([-1, 5000])),
    "scale": (st.sampled_from([None, 0.2, 1, 0.0]), REAL_JUNK,
              st.sampled_from([-1.0, float("nan"), float("inf")])),
    # per layer, chosen by the presets: only their wrong kinds are drawn (any value of the
    # right kind interacts with the preset's other fields)
    "rank": (None, st.sampled_from([16.0, "16", True]), None),
    "score_rank": (None, st.sampled_from([8.0, "8", False]), None),
    "key_bits": (None, st.sampled_from([4.0, "4", True]), None),
    "key_group": (None, st.sampled_from([32.0, "32"]), None),
    "value_group": (None, st.sampled_from([32.0, "32", None]), None),
}
AUTO_CHOSEN = {"rank", "score_rank", "value_bits", "value_group", "key_bits", "key_group"}


PRESETS = ["sals-25", "sals-12.5", "dense-equivalent", None, "auto"]


def _calibration(s, label):
    return {"calib": s["calib"], "path": s["path"], "pathlib": pathlib.Path(s["path"]),
            "none": None, "other": s["other"], "corrupt": s["corrupt"], "int": 3,
            "dict": {"a": 1}, "bytes": s["path"].encode()}[label]


@st.composite
def patch_options(draw, s):
    """(kwargs, {option: verdict}): a valid set of options, then up to two of them broken.
    Verdicts: "ok"; "type" (a wrong kind, or out of range); "combo" (right alone, wrong with
    the others: kv_fraction without the auto preset, a preset below full rank without a
    calibration, ...)."""
    n_layers = s["n_layers"]
    kw, verdicts = {}, {}
    # ---- a valid set ----
    preset = draw(st.sampled_from(PRESETS + ["<default>"]))
    if preset != "<default>":
        kw["preset"] = preset
    else:
        preset = "sals-25"
    full_rank = preset in ("dense-equivalent", None)
    label = draw(st.sampled_from(["calib", "path", "pathlib"]
                                 + (["none", "<default>"] if full_rank else [])))
    if label != "<default>":
        kw["calibration"] = _calibration(s, label)
    if draw(st.booleans()):
        kw["dense_layers"] = draw(st.sampled_from(
            [None, [], [0], [0, n_layers - 1], (1,), range(2), np.array([0, 1]), {n_layers - 1}]))
    if draw(st.booleans()):
        kw["max_tokens"] = draw(st.sampled_from([None, 1, 64, np.int32(16)]))
    if draw(st.integers(0, 3)) == 0:
        kw["cuda_graph"] = False
    if draw(st.integers(0, 2)) == 0:
        # exact dense layers of a float32 model cost twice dense fp16 K+V: beyond most of the
        # auto preset's targets, so drawn with the fixed presets only
        kw["dense_kv"] = draw(st.sampled_from(["compressed"] + ([] if preset == "auto"
                                                                 else ["exact"])))
    if draw(st.integers(0, 3)) == 0:
        kw["compile"] = False  # True compiles the model (seconds): test_compile.py does that
    fields = [n for n, (right, _, _) in CONFIG_FIELDS.items() if right is not None
              and not (preset == "auto" and n in AUTO_CHOSEN)]
    for name in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
        kw[name] = draw(CONFIG_FIELDS[name][0])
    if preset == "auto":
        kw["kv_fraction"] = draw(st.one_of(st.floats(0.4, 1.0),
                                           st.sampled_from([1, np.float64(0.5)])))
        if draw(st.booleans()):
            kw["kv_context"] = draw(st.sampled_from([0, 1024, 4096, np.int64(2048)]))
    verdicts.update({n: "ok" for n in kw})
    # ---- up to two broken ----
    breakable = ["preset", "calibration", "dense_layers", "max_tokens", "cuda_graph", "field",
                 "kv_fraction", "kv_context", "unknown", "dense_kv", "compile"] + (
                     ["auto_chosen"] if preset == "auto" else [])
    count = draw(st.sampled_from([0, 1, 1, 1, 2]))
    for what in draw(st.lists(st.sampled_from(breakable), min_size=count, max_size=count,
                              unique=True)):
        if what == "preset":
            kw["preset"] = draw(st.sampled_from(["sals-50", "", "Sals-25", 3, b"sals-25",
                                                 ["sals-25"]]))
            verdicts["preset"] = "type"
        elif what == "calibration":
            label = draw(st.sampled_from(["int", "other", "corrupt", "dict", "bytes"]
                                         + ([] if full_rank else ["none", "<default>"])))
            kw.pop("calibration", None)
            verdicts.pop("calibration", None)
            if label != "<default>":
                kw["calibration"] = _calibration(s, label)
            # a preset below full rank without a calibration: "combo"; a corrupt file: named
            verdicts["calibration"] = "combo" if label in ("none", "<default>") else "type"
            if label == "corrupt":
                verdicts[s["corrupt"]] = "type"
        elif what == "dense_layers":
            kw["dense_layers"] = draw(st.sampled_from(
                [[n_layers], [-1], [0.5], [True], ["0"], "01", [np.float64(1)], [0, None]]))
            verdicts["dense_layers"] = "type"
        elif what == "max_tokens":
            kw["max_tokens"] = draw(st.sampled_from([0, -1, 47.9, True, "64", 2**31, 2**40,
                                                     np.float32(16)]))
            verdicts["max_tokens"] = "type"
        elif what == "cuda_graph":
            # True: a CPU model (UnsupportedError); np.bool_ is refused too (not a bool)
            kw["cuda_graph"] = draw(st.sampled_from([True, 0, 1, "False", None,
                                                     np.bool_(False)]))
            verdicts["cuda_graph"] = "type"
        elif what == "dense_kv":
            kw["dense_kv"] = draw(st.sampled_from(["Exact", "dense", "", None, 1, True,
                                                   b"exact", ["exact"]]))
            verdicts["dense_kv"] = "type"
        elif what == "compile":
            # True: refused for Gemma 3's sliding-window layers (Llama would compile)
            kw["compile"] = draw(st.sampled_from([0, 1, "yes", "False", None, 1.0]
                                                 + ([True] if s["family"] == "gemma3" else [])))
            verdicts["compile"] = "type"
        elif what == "field":
            name = draw(st.sampled_from(sorted(CONFIG_FIELDS)))
            _, junk, out = CONFIG_FIELDS[name]
            options = [junk.map(lambda v: (v, "type"))] if junk is not None else []
            if out is not None:
                options.append(out.map(lambda v: (v, "type")))
            kw[name], verdicts[name] = draw(st.one_of(options))
            if preset == "auto" and name in AUTO_CHOSEN:
                verdicts[name] = "combo"  # chosen per layer by the auto preset
        elif what == "kv_fraction":
            if preset == "auto":
                value = draw(st.sampled_from([0.0, -0.1, 1.5, float("nan"), 0.001, "0.3", True,
                                              None, "<missing>"]))
                if value == "<missing>":
                    kw.pop("kv_fraction")
                    verdicts["kv_fraction"] = "combo"
                else:
                    kw["kv_fraction"], verdicts["kv_fraction"] = value, "type"
            else:
                kw["kv_fraction"], verdicts["kv_fraction"] = 0.5, "combo"  # auto only
        elif what == "kv_context":
            if preset == "auto":
                kw["kv_context"] = draw(st.sampled_from([-1, 2**40, 4096.5, "4096", True, None]))
                verdicts["kv_context"] = "type"
            else:
                kw["kv_context"], verdicts["kv_context"] = 1024, "combo"  # auto only
        elif what == "auto_chosen":
            name = draw(st.sampled_from(sorted(AUTO_CHOSEN)))
            kw[name], verdicts[name] = draw(st.sampled_from([4, 16, 32])), "combo"
        else:
            name = draw(st.sampled_from(["foo", "Rank", "kv_frac", "max_batch", "n_head_q",
                                         "n_head_kv", "head_dim", "device"]))
            kw[name], verdicts[name] = draw(st.sampled_from([1, "x", None])), "type"
    return kw, verdicts


def logits_unchanged(s) -> None:
    got = tiny.logits(s["model"], s["ids"])
    assert torch.equal(got, s["ref"]), "the model's forward changed"


@FUZZ
@given(st.data())
def test_patch_options(data):
    s = setup(data.draw(st.sampled_from(["llama", "llama", "gemma3"])))
    model = s["model"]
    kw, verdicts = data.draw(patch_options(s))
    bad = [n for n, v in verdicts.items() if v in ("type", "combo")]
    event("refused" if bad else f"patched and generated ({kw.get('preset', 'sals-25')})")
    if bad:
        with pytest.raises(sals.SalsError) as e:
            sals.hf.patch(model, **kw)
        msg = str(e.value)
        # a file is named by its path
        patterns = [re.escape(n) if os.path.isabs(n) else rf"\b{re.escape(n)}\b" for n in bad]
        assert any(re.search(p, msg) for p in patterns), \
            f"error does not name any of {bad} ({kw}): {type(e.value).__name__}: {msg}"
        assert not sals.hf.is_patched(model)
        logits_unchanged(s)
        return
    try:
        assert sals.hf.patch(model, **kw) is model
        assert sals.hf.is_patched(model)
        out = model.generate(s["ids"], max_new_tokens=2, do_sample=False)
        assert out.shape == (1, s["ids"].shape[1] + 2)
        assert torch.equal(out[:, :s["ids"].shape[1]], s["ids"])
    finally:
        if sals.hf.is_patched(model):
            sals.hf.unpatch(model)
    assert not sals.hf.is_patched(model)
    logits_unchanged(s)


@pytest.mark.parametrize("field, value", [("n_sink", -1), ("value_bits", 3),
                                          ("budget_frac", 1.5), ("n_threads", 5000)])
def test_patch_refuses_out_of_range_config_values(field, value):
    s = setup("llama")
    try:
        with pytest.raises(sals.InvalidArgumentError, match=rf"\b{field}\b"):
            sals.hf.patch(s["model"], preset="dense-equivalent", **{field: value})
    finally:
        if sals.hf.is_patched(s["model"]):
            sals.hf.unpatch(s["model"])


def test_an_unknown_preset_is_named_as_preset():
    with pytest.raises(sals.InvalidArgumentError, match="^preset: "):
        sals.hf.patch(setup("llama")["model"], preset="sals-50")


@pytest.mark.parametrize("options", [{"dense_layers": 5},
                                     {"preset": "auto", "kv_fraction": 0.5, "n_sink": None},
                                     {"preset": "auto", "kv_fraction": 0.5, "n_recent": "4"}])
def test_wrong_kinds_never_raise_type_error(options):
    s = setup("llama")
    with pytest.raises(sals.InvalidArgumentError):
        sals.hf.patch(s["model"], calibration=s["calib"], **options)
    assert not sals.hf.is_patched(s["model"])


def test_a_failed_repatch_keeps_the_previous_patch():
    s = setup("llama")
    model = s["model"]
    sals.hf.patch(model, preset="dense-equivalent", dtype="float32")
    try:
        with pytest.raises(sals.InvalidArgumentError, match="^foo: "):
            sals.hf.patch(model, preset="dense-equivalent", foo=1)
        assert sals.hf.is_patched(model)
    finally:
        if sals.hf.is_patched(model):
            sals.hf.unpatch(model)
