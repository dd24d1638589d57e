"""The SALS settings in a vLLM configuration, checked when vLLM builds it (no engine starts):
what is accepted, and what is refused with an error naming the setting, the model or the
calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("vllm")

import sals  # noqa: E402
from sals.vllm import _plan  # noqa: E402


def engine_config(model: str, settings, **engine):
    """vLLM's configuration of ``model`` with ``additional_config={"sals": settings}``; vLLM
    checks it with the SALS platform's check_and_update_config."""
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=model, dtype="float32", max_model_len=256, kv_cache_memory_bytes=16 << 20,
                skip_tokenizer_init=True, additional_config={"sals": settings})
    args.update(engine)
    return EngineArgs(**args).create_engine_config()


def _write_config(tmp_path, name: str, config: dict) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="module")
def model(smollm2):
    return smollm2[2]


def test_dense_equivalent_needs_no_calibration(model):
    config = engine_config(model, {"preset": "dense-equivalent", "dtype": "float32"})
    plan = _plan.make_plan(config)
    assert plan.n_layers == 30 and plan.model_type == "llama"
    # float32 latent keys of rank Dk = 192 and float32 values: dense K and V's size
    assert plan.slot_bytes == 2 * 192 * 4
    assert [c.dense for c in plan.configs].count(True) == 3  # layers 0, 1 and 29
    np.testing.assert_array_equal(plan.projections[5], np.eye(192, dtype=np.float32))
    assert plan.window_capacity == config.scheduler_config.max_num_seqs * (16 + 64)


def test_sals25_with_a_calibration(model, smollm2_calibration):
    settings = {"calibration": smollm2_calibration, "budget_frac": 0.25, "n_recent": 32,
                "dense_layers": [0], "window_capacity": 100}
    plan = _plan.make_plan(engine_config(model, settings))
    cfg = plan.configs[7]
    assert (cfg.rank, cfg.value_bits, cfg.budget_frac, cfg.n_recent) == (48, 4, 0.25, 32)
    assert [c.dense for c in plan.configs].count(True) == 1 and plan.window_capacity == 100
    assert plan.slot_bytes == sals.PagedLayer.slot_bytes_for(cfg) == 48 * 2 + 96 + 6 * 4
    calib = sals.Calibration.load(smollm2_calibration)
    np.testing.assert_array_equal(plan.projections[7], calib.projection(7, 48))


REFUSED = {
    "no calibration": ({"preset": "sals-25"},
                       r"calibration: preset 'sals-25' keeps rank 48 of Dk=192 at layer 0, "
                       r"which needs a calibration .* additional_config \{\"sals\": "
                       r"\{\"calibration\": FILE\}\}"),
    "unknown setting": ({"preset": "sals-25", "budget": 0.5},
                        r"additional_config\.sals\.budget: not a SALS setting"),
    "model's field": ({"preset": "dense-equivalent", "head_dim": 32},
                      r"additional_config\.sals\.head_dim: not a SALS setting"),
    "bad preset": ({"preset": "sals-50"}, r"additional_config\.sals\.preset: 'sals-50'"),
    "bad field value": ({"preset": "dense-equivalent", "value_bits": 3},
                        r"additional_config\.sals: config\.value_bits: 3 not one of"),
    "missing file": ({"calibration": "/nonexistent/x.salscal"},
                     r"additional_config\.sals\.calibration: '/nonexistent/x\.salscal': no such"),
    "dense layer": ({"preset": "dense-equivalent", "dense_layers": [30]},
                    r"additional_config\.sals\.dense_layers: \[30\] outside 0\.\.29"),
    "not an object": (["sals-25"], r"additional_config\.sals: expected an object of settings, "
                                   r"got list"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_settings_are_refused_naming_them(model, case):
    settings, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        engine_config(model, settings)


def test_a_calibration_of_another_model_is_refused(model, tmp_path):
    calibrator = sals.Calibrator([128] * 30)
    rng = np.random.default_rng(0)
    for layer in range(30):
        calibrator.update(layer, rng.standard_normal((200, 128)))
    path = str(tmp_path / "other.salscal")
    calibrator.finish(rank_frac=0.25, fingerprint={"model_type": "llama", "n_head_kv": 2,
                                                   "head_dim": 64, "n_layers": 30}).save(path)
    with pytest.raises(ValueError, match=r"calibration: made for another model \(.*n_head_kv: "
                                         r"calibration 2, model 3"):
        engine_config(model, {"calibration": path})


def test_kv_cache_dtype_is_refused(model):
    with pytest.raises(sals.UnsupportedError, match=r"cache_config\.cache_dtype: 'fp8'.* use "
                                                   r"kv_cache_dtype 'auto'"):
        engine_config(model, {"preset": "dense-equivalent"}, kv_cache_dtype="fp8")


def test_unsupported_models_are_refused(tmp_path):
    gpt2 = _write_config(tmp_path, "gpt2", {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_head": 4,
        "n_layer": 2, "n_positions": 512, "vocab_size": 1000})
    with pytest.raises(sals.UnsupportedError, match=r"model: GPT2LMHeadModel \(model_type 'gpt2'\) "
                                                   r"is not supported by the SALS vLLM backend; "
                                                   r"supported model types: llama, mistral, "
                                                   r"qwen2, qwen3"):
        engine_config(gpt2, {"preset": "dense-equivalent"})
    mistral = _write_config(tmp_path, "mistral", {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 512,
        "sliding_window": 64, "rope_theta": 10000.0})
    with pytest.raises(sals.UnsupportedError, match=r"model: MistralForCausalLM has sliding-window "
                                                   r"attention layers \(sliding_window 64\)"):
        engine_config(mistral, {"preset": "dense-equivalent"})


def test_without_sals_settings_vllm_is_unchanged(model):
    """No additional_config.sals: the platform is vLLM's CPU platform, attention vLLM's own."""
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=model, dtype="float32", max_model_len=256,
                        kv_cache_memory_bytes=16 << 20,
                        skip_tokenizer_init=True).create_engine_config()
    assert _plan.settings_of(config) is None
