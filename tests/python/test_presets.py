"""sals.presets: the preset objects are the names' meaning (Config.preset gives identical
Configs for either form), the auto preset's string form takes its arguments from keyword
options, and anything else is refused naming the argument."""

import numpy as np
import pytest
import sals
from sals import presets


@pytest.mark.parametrize("name, obj", [("sals-25", presets.SALS_25),
                                       ("sals-12.5", presets.SALS_12_5),
                                       ("dense-equivalent", presets.DENSE_EQUIVALENT)])
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 128), (9, 3, 64), (2, 1, 4)])
def test_a_name_and_its_object_give_the_same_config(name, obj, hq, hkv, d):
    assert obj.name == name and presets.NAMED[name] is obj
    assert presets.parse(name) is obj and presets.parse(obj) is obj
    assert (sals.Config.preset(obj, hq, hkv, d, max_tokens=100, dtype="bfloat16")
            == sals.Config.preset(name, hq, hkv, d, max_tokens=100, dtype="bfloat16"))


def test_the_paper_objects_hold_the_papers_settings():
    assert presets.SALS_25 == presets.Paper(0.25, 4)
    assert presets.SALS_12_5 == presets.Paper(rank_frac=0.125, value_bits=2)
    # numpy scalars are stored as the plain numbers, so the objects stay equal
    assert presets.Paper(np.float32(0.25), np.int64(4)) == presets.SALS_25
    assert type(presets.Paper(np.float32(0.25), np.int64(4)).value_bits) is int
    assert presets.SALS_25.config_fields(256) == dict(
        rank=64, score_rank=32, value_bits=4, budget_frac=0.125, n_sink=16, n_recent=64)
    assert presets.SALS_12_5.config_fields(4)["rank"] == 1  # at least one direction
    assert sals.config.PRESETS == ("sals-25", "sals-12.5", "dense-equivalent")


@pytest.mark.parametrize("args, match", [
    ((0.5, 4), r"^preset: Paper\(0.5, 4\) is not one of the paper's settings"),
    ((0.25, 2), r"^preset: Paper\(0.25, 2\) is not one"),
    (("0.25", 4), r"^rank_frac: expected a real number"),
    ((0.25, 4.0), r"^value_bits: expected an int"),
])
def test_other_paper_settings_are_refused(args, match):
    with pytest.raises(sals.InvalidArgumentError, match=match):
        presets.Paper(*args)


def test_auto_checks_its_arguments():
    assert presets.Auto(0.2) == presets.Auto(0.2, presets.DEFAULT_CONTEXT)
    assert presets.Auto(np.float64(0.5), np.int64(0)) == presets.Auto(0.5, 0)
    assert presets.Auto(1).kv_fraction == 1.0 and presets.Auto(0.2).name == "auto"
    for args, match in [((0.0,), r"^kv_fraction: expected \(0, 1\], got 0.0"),
                        ((float("nan"),), r"^kv_fraction: expected \(0, 1\]"),
                        (("0.3",), r"^kv_fraction: expected a real number"),
                        ((True,), r"^kv_fraction: expected a real number"),
                        ((0.3, 4096.5), r"^kv_context: expected an int"),
                        ((0.3, -1), r"^kv_context: -1 not in 0\.\.")]:
        with pytest.raises(sals.InvalidArgumentError, match=match):
            presets.Auto(*args)


def test_the_keyword_form_of_auto_pops_its_arguments():
    options = {"kv_fraction": 0.2, "kv_context": 0, "dtype": "float32"}
    assert presets.parse("auto", options) == presets.Auto(0.2, 0)
    assert options == {"dtype": "float32"}
    options = {"kv_fraction": 0.2}
    assert presets.parse("auto", options) == presets.Auto(0.2) and options == {}
    assert presets.parse(None, {"dtype": "float32"}) is None  # patch's "no preset"
    assert presets.parse(presets.Auto(0.3), {}) == presets.Auto(0.3)


@pytest.mark.parametrize("preset, options, match", [
    ("auto", {}, r"^kv_fraction: preset 'auto' needs kv_fraction="),
    ("auto", {"kv_context": 0}, r"^kv_fraction: preset 'auto' needs kv_fraction="),
    ("sals-25", {"kv_fraction": 0.2}, r"^kv_fraction, kv_context: only for preset='auto'"),
    (None, {"kv_context": 0}, r"^kv_fraction, kv_context: only for preset='auto'"),
    (presets.Auto(0.2), {"kv_fraction": 0.3}, r"^kv_fraction, kv_context: only for"),
    ("sals-50", {}, r"^preset: unknown preset 'sals-50'; expected one of \('sals-25', "
                    r"'sals-12.5', 'dense-equivalent', 'auto', None\)"),
    ("Sals-25", {}, r"^preset: unknown preset 'Sals-25'"),
    (b"sals-25", {}, r"^preset: unknown preset b'sals-25'"),
    (["sals-25"], {}, r"^preset: unknown preset \['sals-25'\]"),
    (presets.Paper, {}, r"^preset: unknown preset <class"),
])
def test_parse_refuses_what_is_not_a_preset(preset, options, match):
    with pytest.raises(sals.InvalidArgumentError, match=match):
        presets.parse(preset, options)


@pytest.mark.parametrize("preset", [None, "auto", "sals-50", 3, np.array(["sals-25"])])
def test_without_options_only_names_and_objects_are_presets(preset):
    with pytest.raises(sals.InvalidArgumentError,
                       match=r"^preset: unknown preset .*; expected one of \('sals-25', "
                             r"'sals-12.5', 'dense-equivalent'\) or a sals.presets object"):
        presets.parse(preset)


@pytest.mark.parametrize("name", ["auto", None, "sals-50", 3])
def test_config_preset_names_its_argument(name):
    with pytest.raises(sals.InvalidArgumentError, match=r"^name: unknown preset"):
        sals.Config.preset(name, 4, 2, 64)


def test_config_preset_refuses_auto_objects():
    with pytest.raises(sals.InvalidArgumentError,
                       match=r"^name: preset 'auto' plans each layer's settings from a "
                             r"calibration; use sals.hf.patch"):
        sals.Config.preset(presets.Auto(0.2), 4, 2, 64)


def test_presets_are_immutable_and_hashable():
    with pytest.raises(AttributeError):
        presets.SALS_25.value_bits = 2
    assert len({presets.SALS_25, presets.Paper(0.25, 4), presets.DenseEquivalent(),
                presets.DENSE_EQUIVALENT, presets.Auto(0.2), presets.Auto(0.2, 4096)}) == 3
