"""Runs vLLM for tests/vllm_plugin/test_e2e.py in a process of its own and prints one JSON line.

    python vllm_run.py SPEC_FILE

SPEC_FILE holds {"model": dir, "prompts": {set: [[token ids], ...]}, "runs": {name: run}}, a
run being {"prompts": set, "sals": settings or null, "engine": LLM keyword arguments,
"max_tokens": n, "ignore_eos": bool, "repeat": k}: greedy generation of every prompt of the
set, k times in a row (prefix caching serves the repeats). The
output maps each run's name to its tokens (per repeat, per prompt), the KV cache capacity vLLM
reports (tokens), the prefix-cache hits (tokens), the preemptions and its wall time.
"""

from __future__ import annotations

import gc
import json
import sys
import time


def preemptions(llm) -> int:
    for metric in llm.get_metrics():
        if metric.name == "vllm:num_preemptions":
            return int(metric.value)
    raise RuntimeError("vllm:num_preemptions not among vLLM's metrics")


def run(model: str, prompts: list, spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    kwargs = dict(model=model, dtype="float32", enforce_eager=True, seed=0,
                  disable_log_stats=False, **spec.get("engine", {}))
    if spec.get("sals") is not None:
        kwargs["additional_config"] = {"sals": spec["sals"]}
    llm = LLM(**kwargs)
    cache = llm.llm_engine.vllm_config.cache_config
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 32),
                            ignore_eos=spec.get("ignore_eos", False))
    tokens, cached = [], []
    for _ in range(spec.get("repeat", 1)):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)
        tokens.append([list(o.outputs[0].token_ids) for o in outs])
        cached.append([o.num_cached_tokens or 0 for o in outs])
    result = dict(tokens=tokens, cached=cached, capacity=cache.num_gpu_blocks * cache.block_size,
                  preemptions=preemptions(llm), seconds=time.perf_counter() - start)
    del llm
    gc.collect()
    return result


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    results = {name: run(spec["model"], spec["prompts"][r["prompts"]], r)
               for name, r in spec["runs"].items()}
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
