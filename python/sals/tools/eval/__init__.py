"""``python -m sals eval``: accuracy of SALS settings against dense attention and baselines at
equal KV memory, on offline RULER-style tasks, held-out perplexity and per-layer attention
overlap (see ``sals.tools.eval.cli``)."""
