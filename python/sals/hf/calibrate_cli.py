"""``python -m sals calibrate``: calibrate a local HuggingFace model and write the projection file.

    python -m sals calibrate --model DIR_OR_ID [--gguf-file NAME] --out FILE
        [--tokens N] [--seq-len L] [--rank-frac 0.25 | --energy 0.99]
        [--text FILE | --source stdlib|debian-docs]

The model is loaded from local files only. The default text is the docstrings of the Python
standard library (offline, deterministic); ``--text`` takes any UTF-8 text file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import Calibration


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sals calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="model directory, locally cached hub id, or .gguf file (never downloaded)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--out", required=True, help="calibration file to write")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--seq-len", type=int, default=1024,
                   help="tokens per calibration sequence (default 1024)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--rank-frac", type=float,
                      help="keep rank = frac * Dk per layer (default 0.25: serves sals-25 and "
                           "sals-12.5)")
    rule.add_argument("--energy", type=float,
                      help="keep the fewest directions holding this fraction of key energy")
    p.add_argument("--text", help="UTF-8 text file (default: Python stdlib docstrings)")
    p.add_argument("--source", choices=("stdlib", "debian-docs"),
                   help="built-in text instead of --text: 'stdlib' docstrings (the default) or "
                        "'debian-docs' (python3.11-doc and debian-reference-en, when installed)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def report(calib: Calibration) -> str:
    """Per-layer table: Dk, kept rank, and the fraction of key energy kept at Dk/4, Dk/8 and
    at the kept rank."""
    lines = [f"{'layer':>5} {'Dk':>6} {'rank':>6} {'E@Dk/4':>8} {'E@Dk/8':>8} {'E@rank':>8}"]
    for i, layer in enumerate(calib.layers):
        lines.append(f"{i:>5} {layer.dk:>6} {layer.rank:>6} "
                     f"{calib.energy(i, max(1, layer.dk // 4)):>8.4f} "
                     f"{calib.energy(i, max(1, layer.dk // 8)):>8.4f} "
                     f"{calib.energy(i, layer.rank):>8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from . import calibrate, loading

    text = data = None
    if args.text is not None:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
        data = f"text file {os.path.basename(args.text)}"
    elif args.source is not None and args.source != "stdlib":
        from .corpus import calibration_text

        text, data = calibration_text(args.source)
    start = time.perf_counter()
    model, tokenizer = loading.load(args.model, args.gguf_file, args.device, args.dtype)
    print(f"loaded {type(model).__name__} from {args.model} in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    calib = calibrate.calibrate(model, tokenizer, n_tokens=args.tokens, seq_len=args.seq_len,
                                rank_frac=args.rank_frac, energy=args.energy, text=text,
                                data=data, progress=not args.quiet)
    calib.save(args.out)
    print(report(calib))
    print(f"wrote {args.out}: {len(calib.layers)} layers, {calib.n_tokens} tokens ({calib.data}), "
          f"{time.perf_counter() - start:.1f} s")
    return 0
