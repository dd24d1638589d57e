"""What query-weighted projections change in the attention itself: per layer of a real model,
the relative error of rebuilt keys and of the attention output computed over them, for plain
PCA (query weight 0) and query-weighted projections, at one rank.

    python benchmarks/query_weighting.py [--model smollm2] [--rank-frac 0.25]
        [--weights 0,0.5,1] [--calibration-tokens 8192] [--heldout-tokens 2048] [--out FILE]

One calibration pass (``debian-docs`` text) collects keys and query energies; each weight is a
``Calibrator.finish`` of it. Held-out text (``sals.hf.corpus.heldout_text``) is run through the
model once, capturing every layer's pre-RoPE q, k, v and its RoPE cos/sin. For each layer the
keys rebuilt as the cache rebuilds them, ``((k * s) U) U^T / s``, replace the exact keys in
causal softmax attention (RoPE applied by the model's own function, GQA as the model reads
it), and the output of the queries past the first quarter of the text is compared with exact
attention. Everything runs in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' or 'gemma3' (the eval's)")
    p.add_argument("--rank-frac", type=float, default=0.25)
    p.add_argument("--weights", default="0,0.5,1", help="query weights to compare")
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--heldout-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", help="JSON file to write")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import sals
    from sals.tools.eval.cli import load_model
    from sals.hf import calibrate, corpus, describe, modeling_function, pre_rope

    model, tok, label = load_model(args.model, device="cpu", dtype="float32")
    info = describe(model)
    text, data = corpus.calibration_text("debian-docs")
    cal = sals.Calibrator([layer.dk for layer in info.layers])
    calibrate.collect_keys(model, calibrate.token_chunks(tok, text, args.calibration_tokens,
                                                         1024), cal, progress=False, info=info)
    weights = [float(w) for w in args.weights.split(",")]
    calibs = {w: cal.finish(rank_frac=args.rank_frac, query_weight=w) for w in weights}

    held, _ = corpus.heldout_text()
    ids = tok(held, add_special_tokens=False)["input_ids"][:args.heldout_tokens]
    captured = {}

    def hook(layer):
        def pre_hook(module, hargs, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else hargs[0]
            q, k, v = pre_rope(module, hidden)
            captured[layer.index] = (q[0], k[0], v[0], kwargs["position_embeddings"])
        return pre_hook

    handles = [layer.module.register_forward_pre_hook(hook(layer), with_kwargs=True)
               for layer in info.layers]
    with torch.no_grad():
        model(torch.tensor([ids]), use_cache=False)
    for h in handles:
        h.remove()

    n = len(ids)
    first = n // 4
    causal = torch.ones(n, n, dtype=torch.bool).tril()[first:]
    rows = []
    for layer in info.layers:
        q, k, v, (cos, sin) = captured[layer.index]
        apply_rope = modeling_function(layer.module, "apply_rotary_pos_emb")
        g = layer.n_head_q // layer.n_head_kv

        def attend(keys):
            qr, kr = apply_rope(q.transpose(0, 1)[None], keys.transpose(0, 1)[None], cos, sin)
            kr = kr[0].repeat_interleave(g, 0)
            vv = v.transpose(0, 1).repeat_interleave(g, 0)
            logits = qr[0, :, first:] @ kr.transpose(1, 2) * layer.scaling
            if layer.sliding:
                window = torch.ones(n, n, dtype=torch.bool).triu(-layer.sliding_window + 1)
                mask = causal & window[first:]
            else:
                mask = causal
            return logits.masked_fill(~mask, float("-inf")).softmax(-1) @ vv

        exact = attend(k)
        flat = k.reshape(n, -1)
        row = {"layer": layer.index}
        for w, c in calibs.items():
            rebuilt = calibrate.rebuilt_keys(flat, c.projection(layer.index),
                                             c.key_scale(layer.index))
            out = attend(rebuilt.reshape(k.shape))
            row[f"key_err_{w:g}"] = float((rebuilt - flat).norm() / flat.norm())
            row[f"out_err_{w:g}"] = float((out - exact).norm() / exact.norm())
        rows.append(row)
        print(" ".join(f"{key}={val:.3f}" if isinstance(val, float) else f"{key}={val}"
                       for key, val in row.items()), flush=True)
    summary = {f"{kind}_{w:g}": sum(r[f"{kind}_{w:g}"] for r in rows) / len(rows)
               for w in weights for kind in ("key_err", "out_err")}
    print("mean over layers:", json.dumps({k: round(v, 4) for k, v in summary.items()}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": label, "rank_frac": args.rank_frac, "calibration": data,
                       "calibration_tokens": args.calibration_tokens, "heldout_tokens": n,
                       "layers": rows, "mean": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
