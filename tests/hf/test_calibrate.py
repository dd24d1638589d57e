"""Calibration: the offline stdlib text, the keys collected, and ``python -m sals calibrate``
on a tiny model saved to disk with its own word-level tokenizer."""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest
import sals
import sals.hf
import tiny
import torch
from sals.hf import calibrate, corpus
from sals.tools import calibrate as calibrate_cli


def test_stdlib_text_is_offline_deterministic_prose():
    text = corpus.stdlib_text()
    assert len(text) > 300_000
    assert text == corpus.stdlib_text()
    assert json.dumps.__doc__.strip().splitlines()[0] in text
    assert "standard library" in corpus.stdlib_description()


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_collected_keys_are_pre_rope_after_k_norm(family):
    """The calibrator sees k_norm(k_proj(input_layernorm(h))) of every layer: its accumulated
    energy (trace of K^T K = sum of eigenvalues) equals that of keys recomputed by hand from
    the hidden states."""
    model = tiny.model(family)
    ids = tiny.prompt(40)
    info = sals.hf._arch.describe(model)
    cal = sals.Calibrator([layer.dk for layer in info.layers])
    calibrate.collect_keys(model, [ids], cal, progress=False)
    calib = cal.finish(rank=8)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        for layer, decoder in zip(info.layers, model.model.layers):
            attn = decoder.self_attn
            k = attn.k_proj(decoder.input_layernorm(hidden[layer.index]))
            k = attn.k_norm(k.view(1, 40, -1, attn.head_dim)).reshape(40, -1).double()
            expect = (k * k).sum().item()
            got = calib.layers[layer.index].eigenvalues.sum()
            assert got == pytest.approx(expect, rel=1e-5)


def _save_tiny(path, family="llama", seed=0):
    """A tiny model and a word-level tokenizer over the 90 commonest words of the stdlib text,
    saved as a local model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = re.findall(r"\w+", corpus.stdlib_text()[:200_000].lower())
    vocab = {"[UNK]": 3}
    for i, (w, _) in enumerate(collections.Counter(words).most_common(90)):
        vocab[w] = 4 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    model = tiny.model(family, seed=seed)
    model.save_pretrained(path)
    return model


def test_cli_calibrates_a_local_model(tmp_path, capsys):
    model = _save_tiny(tmp_path / "model")
    out = tmp_path / "tiny.salscal"
    assert calibrate_cli.main(["--model", str(tmp_path / "model"), "--out", str(out),
                               "--tokens", "512", "--seq-len", "128", "--quiet"]) == 0
    report = capsys.readouterr().out
    row = r"^\s+0\s+64\s+16\s+0\.\d{4}\s+0\.\d{4}\s+0\.\d{4}$"  # layer Dk rank energies
    assert re.search(row, report, re.MULTILINE), report
    assert "512 tokens (docstrings of the Python" in report
    calib = sals.Calibration.load(out, fingerprint=sals.hf.fingerprint(model))
    assert [layer.rank for layer in calib.layers] == [16] * 4
    assert calib.n_tokens == 512
    # the file drives patch: SALS-25 (rank 16) and SALS-12.5 (rank 8) both fit in rank 16
    for preset in ("sals-25", "sals-12.5"):
        sals.hf.patch(model, calibration=str(out), preset=preset)
        out_ids = model.generate(tiny.prompt(20), max_new_tokens=4, do_sample=False)
        assert out_ids.shape == (1, 24)
    with pytest.raises(sals.CalibrationError, match="stores rank 16, the settings need 32"):
        sals.hf.patch(model, calibration=str(out), preset=None, rank=32)
    # a checkpoint of the same shape but other weights is caught by the weight digest
    with pytest.raises(sals.CalibrationError, match="weights_sha256"):
        sals.hf.patch(tiny.model("llama", seed=5), calibration=str(out))


def test_cli_energy_rule_and_text_file(tmp_path, capsys):
    _save_tiny(tmp_path / "model", family="qwen2")
    text = tmp_path / "words.txt"
    text.write_text(" ".join(["the module returns a new list of values"] * 200))
    out = tmp_path / "e.salscal"
    assert calibrate_cli.main(["--model", str(tmp_path / "model"), "--out", str(out),
                               "--tokens", "256", "--seq-len", "64", "--energy", "0.9",
                               "--text", str(text), "--quiet"]) == 0
    calib = sals.Calibration.load(out)
    assert "text file words.txt; 256 tokens" in calib.data
    for i, layer in enumerate(calib.layers):
        assert calib.energy(i, layer.rank) >= 0.9
        assert layer.rank == 1 or calib.energy(i, layer.rank - 1) < 0.9
    assert np.allclose(calib.projection(0).T @ calib.projection(0), np.eye(calib.layers[0].rank),
                       atol=1e-5)


def test_cli_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="not available locally; sals never downloads"):
        calibrate_cli.main(["--model", "no-such-org/no-such-model", "--out",
                            str(tmp_path / "x"), "--quiet"])


def test_too_little_text_is_a_calibration_error(tmp_path):
    _save_tiny(tmp_path / "model")
    text = tmp_path / "short.txt"
    text.write_text("the list of values")
    with pytest.raises(sals.CalibrationError, match="holds 4 tokens, fewer than the 64"):
        calibrate_cli.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "x"),
                            "--tokens", "64", "--text", str(text), "--quiet"])


def test_rebuilt_keys_follow_the_scaled_projection():
    """``rebuilt_keys`` is ``((k * s) U) U^T / s`` (float64 numpy reference), plain PCA without
    a scale, and the identity at full rank whatever the scale; read-only arrays are accepted."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((40, 12))
    u = np.linalg.qr(rng.standard_normal((12, 12)))[0]
    s = rng.uniform(0.2, 3.0, 12)
    for a in (u, s):
        a.flags.writeable = False
    keys = torch.tensor(k)
    got = calibrate.rebuilt_keys(keys, u[:, :5], s).numpy()
    np.testing.assert_allclose(got, ((k * s) @ u[:, :5]) @ u[:, :5].T / s, rtol=1e-12)
    plain = calibrate.rebuilt_keys(keys, u[:, :5]).numpy()
    np.testing.assert_allclose(plain, (k @ u[:, :5]) @ u[:, :5].T, rtol=1e-12)
    assert not np.allclose(got, plain)
    np.testing.assert_allclose(calibrate.rebuilt_keys(keys, u, s).numpy(), k, atol=1e-12)
