"""Summaries of an eval's results: the per-setting table (markdown) and PNG plots.

``results`` is the object results.json holds, from the run that wrote it (``cli.finish``) or
``json.load`` of a file written earlier; each setting's row is read as a
``records.Measurement``.
"""

from __future__ import annotations

import random

from .records import Measurement
from .runner import mean

BOOTSTRAP_SAMPLES = 2000


def _measurement(entry: dict, name: str) -> Measurement:
    """Setting ``name``'s row of a ``prompts`` or ``perplexity`` entry."""
    return Measurement.from_json(entry["results"][name])


def paired_difference(results: dict, name: str, ref: str = "dense") -> dict | None:
    """Mean score difference of setting ``name`` from ``ref`` over the prompts both measured,
    with a 95% interval from a paired bootstrap over prompts (``BOOTSTRAP_SAMPLES`` resamples,
    a fixed seed, so the report is reproducible). Prompts are the unit: the tasks' scores are
    far from normal (mostly 0 or 100), and pairing removes the prompts' own difficulty."""
    diffs = [_measurement(p, name).score - _measurement(p, ref).score
             for p in results["prompts"] if name in p["results"] and ref in p["results"]]
    if not diffs:
        return None
    rng = random.Random(0)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n
                   for _ in range(BOOTSTRAP_SAMPLES))
    return {"mean": sum(diffs) / n, "low": means[int(0.025 * BOOTSTRAP_SAMPLES)],
            "high": means[int(0.975 * BOOTSTRAP_SAMPLES) - 1], "prompts": n}


def _by(results: dict, name: str, key: str) -> dict:
    """Mean score of setting ``name`` per value of the prompts' ``key``."""
    return {k: mean(_measurement(p, name).score for p in results["prompts"]
                    if p[key] == k and name in p["results"])
            for k in sorted({p[key] for p in results["prompts"]}, key=str)}


def summarise(results: dict) -> dict:
    """Per setting: RULER average and per task / filler / context scores, KV-memory fractions,
    dense agreement, perplexity, per-layer means."""
    names = [s["name"] for s in results["settings"]]
    out = {}
    for name in names:
        rows = [_measurement(p, name) for p in results["prompts"] if name in p["results"]]
        ppl = [_measurement(p, name) for p in results["perplexity"] if name in p["results"]]
        nll = [x for r in ppl for x in r.nll]
        layers = {}
        for r in rows:
            for idx, stats in (r.layers or {}).items():
                for key, val in stats.to_json().items():  # a dense layer has only key_rel_error
                    layers.setdefault(idx, {}).setdefault(key, []).append(val)
        out[name] = {
            "ruler_avg": mean(r.score for r in rows),
            "vs_dense": paired_difference(results, name) if name != "dense" else None,
            "by_task": _by(results, name, "task"),
            "by_filler": _by(results, name, "filler"),
            "by_context": _by(results, name, "context"),
            "kv_fraction": mean(r.kv_fraction for r in rows + ppl),
            "kv_fraction_model": mean(r.kv_fraction_model for r in rows + ppl),
            # without a dense row no prompt is counted identical
            "identical_to_dense": mean(float(bool(r.identical)) for r in rows),
            "perplexity": float(2.718281828459045 ** mean(nll)) if nll else None,
            "seconds": sum(r.seconds for r in rows + ppl),
            "layers": {i: {k: mean(v) for k, v in m.items()} for i, m in sorted(layers.items())},
        }
    return out


def markdown(results: dict, summary: dict) -> str:
    meta = results["meta"]
    contexts = sorted({p["context"] for p in results["prompts"]})
    tasks = sorted({p["task"] for p in results["prompts"]})
    lines = [f"# sals eval: {meta['model']}", "",
             f"- command: `{meta['command']}`",
             f"- machine: {meta['machine']}; date: {meta['date']}",
             (f"- prompts: {len(results['prompts'])} ({meta['prompts_per_cell']} per task, "
             f"filler and context; tasks {', '.join(tasks)}; contexts {contexts}); "
             f"perplexity: {len(results['perplexity'])} segments of {meta['ppl_tokens']} "
             f"tokens ({meta['heldout']})"),
             f"- calibration: {meta['calibration']}"]
    if meta.get("interrupted"):
        lines.append(f"- stopped {meta['interrupted']}: the tables cover the prompts measured")
    lines += ["",
              "| setting | KV fraction | RULER avg | vs dense [95% CI] | "
              + " | ".join(f"{c}" for c in contexts) + " | "
              + " | ".join(tasks) + " | ppl | = dense |",
              "|---|---:|---:|---:|" + "---:|" * (len(contexts) + len(tasks)) + "---:|---:|"]
    for name, s in summary.items():
        ctx = " | ".join(f"{s['by_context'].get(c, float('nan')):.1f}" for c in contexts)
        tk = " | ".join(f"{s['by_task'].get(t, float('nan')):.1f}" for t in tasks)
        ppl = f"{s['perplexity']:.3f}" if s["perplexity"] else "—"
        d = s.get("vs_dense")
        vs = f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" if d else "—"
        lines.append(f"| {name} | {s['kv_fraction']:.3f} | {s['ruler_avg']:.1f} | {vs} | {ctx} "
                     f"| {tk} | {ppl} | {100 * s['identical_to_dense']:.0f}% |")
    lines += ["", ("KV fraction: bytes held after generation over dense fp16 K+V of the "
              "full-attention layers, from the caches (SalsCache.memory(); StreamingLLM: its "
              "window; dense and oracle hold the full cache). vs dense: mean difference from "
              "dense over the same prompts (points), with a 95% paired-bootstrap interval "
              "over prompts. Context columns and task columns: mean score (RULER "
              "string_match_all, %). = dense: prompts whose generated tokens equal dense's "
              "over their common length (generation stops once every expected string is "
              "present)."), ""]
    sals_rows = [n for n, s in summary.items() if s["layers"]]
    if sals_rows:
        lines += [("## Per layer (first decode step): attention mass kept / candidate recall "
                  "(oracle recall) / key relative error"), "",
                  "| layer | " + " | ".join(sals_rows) + " |",
                  "|---:|" + "---|" * len(sals_rows)]
        all_layers = sorted({i for n in sals_rows for i in summary[n]["layers"]})
        for i in all_layers:
            cells = []
            for n in sals_rows:
                m = summary[n]["layers"].get(i)
                if not m:
                    cells.append("")
                elif "mass_kept" in m:
                    cells.append(f"{m['mass_kept']:.3f} / {m['recall']:.3f} "
                                 f"({m['oracle_recall']:.3f}) / {m['key_rel_error']:.3f}")
                else:
                    cells.append(f"dense / {m['key_rel_error']:.3f}")
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(results: dict, summary: dict, out_dir: str) -> list[str]:
    """accuracy.png (RULER average against context per setting) and overlap.png (attention
    mass kept and key error per layer per SALS setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    contexts = sorted({p["context"] for p in results["prompts"]})
    if contexts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, s in summary.items():
            ax.plot(contexts, [s["by_context"].get(c) for c in contexts], marker="o",
                    label=f"{name} ({s['kv_fraction']:.3f})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("RULER-style average (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{results['meta']['model']}: accuracy against context")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(f"{out_dir}/accuracy.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    sals_rows = [n for n, s in summary.items() if s["layers"]]
    if sals_rows:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
        for n in sals_rows:
            layers = summary[n]["layers"]
            sparse = [i for i in layers if "mass_kept" in layers[i]]
            line, = a.plot(sparse, [layers[i]["mass_kept"] for i in sparse], marker="o",
                           label=n)
            a.plot(sparse, [layers[i]["recall"] for i in sparse], ls=":", marker=".",
                   color=line.get_color(), label=f"{n} (candidate recall)")
            b.plot(sorted(layers), [layers[i]["key_rel_error"] for i in sorted(layers)],
                   marker="o", label=n)
        a.set_xlabel("layer")
        a.set_ylabel("attention mass kept (overlap)")
        a.set_ylim(0, 1.02)
        a.legend(fontsize=7)
        b.set_xlabel("layer")
        b.set_ylabel("relative error of rebuilt keys")
        b.legend(fontsize=7)
        fig.suptitle(f"{results['meta']['model']}: per layer, first decode step")
        fig.tight_layout()
        paths.append(f"{out_dir}/overlap.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
