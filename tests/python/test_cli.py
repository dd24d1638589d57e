"""python -m sals: dispatch and messages."""

import subprocess
import sys

import sals
import sals.__main__ as cli


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "calibrate" in out and "bench" in out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_dispatch_calls_the_module_main(monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("sals.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sals.bench", fake)
    assert cli.main(["bench", "attention", "--quick"]) == 0
    assert seen == [["attention", "--quick"]]


def test_missing_module_message(monkeypatch, capsys):
    monkeypatch.setitem(cli._COMMANDS, "nothing", ("sals.no_such_module", "absent"))
    assert cli.main(["nothing"]) == 1
    assert "no sals.no_such_module module" in capsys.readouterr().err


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "sals", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: python -m sals" in r.stdout


def test_version_and_helpers():
    assert sals.__version__.count(".") == 2
    assert isinstance(sals.cuda_available(), bool)
    import os
    assert os.path.exists(os.path.join(sals.get_include(), "sals", "sals.h"))
    assert os.path.basename(sals.get_library()).startswith("libsals")
