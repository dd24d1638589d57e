"""``python -m sals calibrate``: calibrate a local HuggingFace model and write the projection file.

    python -m sals calibrate --model DIR_OR_ID [--gguf-file NAME] --out FILE
        [--tokens N] [--seq-len L] [--rank-frac 0.25 | --energy 0.99]
        [--text FILE | --source stdlib|debian-docs] [--query-weight 0]

The model is loaded from local files only. The default text is the docstrings of the Python
standard library (offline, deterministic); ``--text`` takes any UTF-8 text file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import Calibration
from . import _cli
from ..calibration import MAX_QUERY_WEIGHT


def _parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m sals calibrate",
        description="Run a local HuggingFace model over text, collect every layer's pre-RoPE "
                    "keys and write the SALS projections (a .salscal file for "
                    "sals.hf.patch(model, calibration=FILE)). The model is loaded from local "
                    "files only; the default text is the docstrings of the Python standard "
                    "library (offline, deterministic).")
    p.add_argument("--model", required=True, metavar="DIR_OR_ID_OR_FILE",
                   help="model directory, locally cached hub id, or .gguf file (never "
                        "downloaded)")
    p.add_argument("--gguf-file", metavar="NAME",
                   help="GGUF file name inside the --model directory")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="calibration file to write (its directory must exist)")
    p.add_argument("--tokens", type=_cli.number(int, 1), default=16384, metavar="N",
                   help="calibration tokens")
    p.add_argument("--seq-len", type=_cli.number(int, 1), default=1024, metavar="L",
                   help="tokens per calibration sequence, each one a forward pass from "
                        "position 0")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--rank-frac", type=_cli.number(float, 0, 1, above=True), metavar="F",
                      help="keep rank = F * Dk per layer (default 0.25: serves sals-25 and "
                           "sals-12.5)")
    rule.add_argument("--energy", type=_cli.number(float, 0, 1, above=True), metavar="E",
                      help="keep the fewest directions holding this fraction of key energy "
                           "(e.g. 0.99)")
    p.add_argument("--text", metavar="FILE",
                   help="UTF-8 text file to calibrate on (default: Python stdlib docstrings)")
    p.add_argument("--source", choices=("stdlib", "debian-docs"),
                   help="built-in text instead of --text: 'stdlib' docstrings (the default) or "
                        "'debian-docs' (python3.11-doc and debian-reference-en, when installed)")
    p.add_argument("--query-weight", type=_cli.number(float, 0, MAX_QUERY_WEIGHT), default=None,
                   metavar="ALPHA",
                   help="weight the projection by the queries' energy per key dimension "
                        "(default 0: plain PCA of the keys; 1 is query-weighted; see sals.calibration)")
    p.add_argument("--device", type=_cli.device,
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _cli.add_debug(p)
    return p


def _check_paths(args) -> None:
    """Fails before torch and the model are loaded (seconds to minutes) on paths that cannot
    work."""
    from ..hf.loading import check_path

    check_path(args.model)
    from ..calibration import MAX_QUERY_WEIGHT

    if args.query_weight is not None and not 0 <= args.query_weight <= MAX_QUERY_WEIGHT:
        raise ValueError(
            f"--query-weight: expected 0..{MAX_QUERY_WEIGHT:g}, got {args.query_weight:g}")
    if args.text is not None and not os.path.isfile(args.text):
        raise FileNotFoundError(f"--text: no such file: {args.text!r}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--out: no such directory: {out_dir!r}")
    if os.path.isdir(args.out):
        raise IsADirectoryError(f"--out: {args.out!r} is a directory; give a file name")


def report(calib: Calibration) -> str:
    """Per-layer table: Dk, kept rank, and the fraction of key energy (query-weighted for
    query-weighted projections) kept at Dk/4, Dk/8 and at the kept rank."""
    lines = [f"{'layer':>5} {'Dk':>6} {'rank':>6} {'E@Dk/4':>8} {'E@Dk/8':>8} {'E@rank':>8}"]
    for i, layer in enumerate(calib.layers):
        lines.append(f"{i:>5} {layer.dk:>6} {layer.rank:>6} "
                     f"{calib.energy(i, max(1, layer.dk // 4)):>8.4f} "
                     f"{calib.energy(i, max(1, layer.dk // 8)):>8.4f} "
                     f"{calib.energy(i, layer.rank):>8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check_paths(args)
    from ..hf import calibrate, loading  # torch, transformers: after the arguments are checked

    text = data = None
    if args.text is not None:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
        data = f"text file {os.path.basename(args.text)}"
    elif args.source is not None and args.source != "stdlib":
        from ..hf.corpus import calibration_text

        text, data = calibration_text(args.source)
    start = time.perf_counter()
    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    say(f"loading {args.model}")
    model, tokenizer = loading.load(args.model, args.gguf_file, args.device, args.dtype,
                                    progress=say)
    print(f"loaded {type(model).__name__} from {args.model} in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    calib = calibrate.calibrate(model, tokenizer, n_tokens=args.tokens, seq_len=args.seq_len,
                                rank_frac=args.rank_frac, energy=args.energy, text=text,
                                data=data, progress=not args.quiet,
                                query_weight=(calibrate.QUERY_WEIGHT if args.query_weight is None
                                              else args.query_weight))
    calib.save(args.out)
    print(report(calib))
    print(f"wrote {args.out}: {len(calib.layers)} layers, {calib.n_tokens} tokens ({calib.data}), "
          f"{time.perf_counter() - start:.1f} s")
    return 0
