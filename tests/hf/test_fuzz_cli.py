"""Property-based command lines of ``python -m sals eval`` and ``python -m sals calibrate``,
run in-process through ``sals.__main__.main`` (what the user's shell runs), with the model
loader replaced by one that records the call and stops: no model is ever loaded.

Each example draws a valid command line (options in random order, ``--opt value`` or
``--opt=value``), then breaks up to two options: a value of the wrong type, out of range, empty,
a file that is not there, two exclusive options, a flag given a value, an unknown option. The
property: a valid command line reaches the model loader (and nothing before it fails); a
broken one exits with a usage error naming a broken option (exit status 2; 1 for a path that
does not exist, as the commands report missing files), on stderr, without a traceback and
without loading a model.

Examples per command: SALS_FUZZ_EXAMPLES (default 100; a few seconds on two cores),
derandomized.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import tempfile

import pytest

pytest.importorskip("hypothesis")
import sals.__main__ as entry
import torch
from hypothesis import given
from hypothesis import strategies as st
from fuzz import FUZZ


_TMP = tempfile.TemporaryDirectory(prefix="sals-fuzz-cli-")
MODEL_DIR = os.path.join(_TMP.name, "model")
TEXT = os.path.join(_TMP.name, "text.txt")
os.makedirs(MODEL_DIR, exist_ok=True)
with open(TEXT, "w") as _f:
    _f.write("some text\n")

# option -> (valid values, [(invalid value, exit statuses allowed)]); None: a flag
INTS_BAD = [("x", {2}), ("1.5", {2}), ("", {2})]
EVAL = {
    "--quick": None, "--full-answers": None, "--quiet": None,
    "--model": ([MODEL_DIR], [("no-such-model", {2}), ("/nonexistent/model", {2}),
                              ("./missing.gguf", {2})]),
    "--gguf-file": (["model.gguf", "x"], []),
    "--device": (["cpu", "cuda", "cuda:0"], [("gpu", {2}), ("", {2}), ("cuda:x", {2}),
                                             ("cuda:-1", {2})]),
    "--dtype": (["float32", "float16", "bfloat16"], [("float64", {2}), ("fp16", {2})]),
    "--threads": (["0", "1", "2"], INTS_BAD + [("-1", {2}), ("100000", {2})]),
    "--tasks": (["niah_single", "vt,fwe", "niah_multikey, niah_multivalue"],
                [("needle", {2}), ("niah_single,bogus", {2})]),
    "--fillers": (["prose", "repeat", "prose,repeat"], [("lorem", {2}), ("prose,x", {2})]),
    "--contexts": (["1024", "1024,2048", "256"], INTS_BAD + [("100", {2}), ("-5", {2}),
                                                            ("0", {2}), ("1k", {2})]),
    "--prompts": (["1", "4"], INTS_BAD + [("0", {2}), ("-1", {2})]),
    "--seed": (["0", "7", "-3"], INTS_BAD),
    "--settings": (["dense", "dense,sals-25", "auto:kv_fraction=0.5", "streaming=sals-25"],
                   [("sals-50", {2}), ("auto", {2}), ("streaming=dense", {2}),
                    ("dense,sals-25:n_sink", {2})]),
    "--calibration-source": (["stdlib", "debian-docs"], [("web", {2}), ("", {2})]),
    "--calibration-tokens": (["1", "4096"], INTS_BAD + [("0", {2}), ("-5", {2})]),
    "--calibration-query-weight": (["0", "1", "4", "0.5"],
                                   [("x", {2}), ("-1", {2}), ("5", {2}), ("nan", {2}),
                                    ("inf", {2})]),
    "--ppl-contexts": (["1024", "256,512"], INTS_BAD + [("100", {2}), ("-5", {2})]),
    "--ppl-segments": (["0", "2"], INTS_BAD + [("-1", {2})]),
    "--ppl-tokens": (["1", "64"], INTS_BAD + [("0", {2}), ("-3", {2})]),
    "--layer-prompts": (["0", "5"], INTS_BAD + [("-1", {2})]),
    "--out": ([os.path.join(_TMP.name, "eval-out")], []),
}
CALIBRATE = {
    "--quiet": None, "--debug": None,
    "--model": ([MODEL_DIR], [("/nonexistent/model", {1}), ("./missing.gguf", {1})]),
    "--gguf-file": (["model.gguf"], []),
    "--out": ([os.path.join(_TMP.name, "c.salscal")],
              [(os.path.join(_TMP.name, "no", "c.salscal"), {1}), (_TMP.name, {1})]),
    "--tokens": (["1", "4096"], INTS_BAD + [("0", {2}), ("-1", {2})]),
    "--seq-len": (["1", "1024"], INTS_BAD + [("0", {2}), ("-2", {2})]),
    "--rank-frac": (["0.25", "1", "1.0"], [("x", {2}), ("0", {2}), ("1.5", {2}), ("-0.1", {2}),
                                          ("nan", {2})]),
    "--energy": (["0.99", "1"], [("x", {2}), ("0", {2}), ("1.01", {2}), ("nan", {2})]),
    "--text": ([TEXT], [(os.path.join(_TMP.name, "missing.txt"), {1})]),
    # debian-docs: refused before loading where its packages are not installed
    "--source": (["stdlib"], [("web", {2})]),
    "--query-weight": (["0", "1", "4", "0.5"], [("x", {2}), ("-1", {2}), ("4.5", {2}),
                                                ("nan", {2}), ("inf", {2})]),
    "--device": (["cpu", "cuda"], [("gpu", {2}), ("", {2}), ("cuda:x", {2})]),
    "--dtype": (["float32", "bfloat16"], [("half", {2})]),
}
REQUIRED = {"eval": [], "calibrate": ["--model", "--out"]}
ALWAYS = {"eval": ["--model"], "calibrate": []}  # eval's default model would be a real one
EXCLUSIVE = {"calibrate": [("--rank-frac", "--energy")], "eval": []}
# what a message may call an option besides its own spelling
ALIASES = {"--settings": r"setting", "--model": r"model", "--contexts": r"contexts?",
           "--ppl-contexts": r"--ppl-contexts|--contexts"}


class Reached(Exception):
    """Raised by the stand-in loader: the command line was accepted."""


CALLS: list = []  # the stand-in loader's calls


class _Loader:
    @staticmethod
    def from_pretrained(*args, **kwargs):
        CALLS.append((args, kwargs))
        raise Reached("the model loader was reached")


def named(option: str, text: str) -> bool:
    bare = option[2:]
    pattern = rf"{re.escape(option)}\b|\b{re.escape(bare)}\b|\b{re.escape(bare.replace('-', '_'))}\b"
    if option in ALIASES:
        pattern += "|" + ALIASES[option]
    return re.search(pattern, text) is not None


@st.composite
def command_lines(draw, command: str):
    """(argv, {option: exit statuses allowed} of the broken options)."""
    table = EVAL if command == "eval" else CALIBRATE
    chosen = set(REQUIRED[command] + ALWAYS[command])
    chosen |= set(draw(st.lists(st.sampled_from(sorted(table)), max_size=6, unique=True)))
    for a, b in EXCLUSIVE[command]:
        if a in chosen and b in chosen:
            chosen.discard(draw(st.sampled_from([a, b])))
    values = {}
    for opt in sorted(chosen):
        values[opt] = None if table[opt] is None else draw(st.sampled_from(table[opt][0]))
    broken: dict = {}
    count = draw(st.sampled_from([0, 1, 1, 1, 2]))
    kinds = ["value", "flag_value", "unknown"] + (["missing"] if REQUIRED[command] else []) \
        + (["exclusive"] if EXCLUSIVE[command] else [])
    for _ in range(count):
        kind = draw(st.sampled_from(kinds))
        if kind == "value":
            opts = [o for o in table if table[o] is not None and table[o][1]]
            opt = draw(st.sampled_from(opts))
            value, statuses = draw(st.sampled_from(table[opt][1]))
            values[opt] = value
            broken[opt] = statuses
        elif kind == "missing":
            opt = draw(st.sampled_from(REQUIRED[command]))
            values.pop(opt, None)
            broken[opt] = {2}
        elif kind == "flag_value":
            flags = [o for o in table if table[o] is None]
            opt = draw(st.sampled_from(flags))
            values[opt] = ("=", draw(st.sampled_from(["1", "yes", ""])))
            broken[opt] = {2}
        elif kind == "unknown":
            opt = draw(st.sampled_from(["--bogus", "--no-such-option", "-x"]))
            values[opt] = draw(st.sampled_from([None, "3"]))
            broken[opt] = {2}
        else:
            a, b = EXCLUSIVE[command][0]
            values[a], values[b] = table[a][0][0], table[b][0][0]
            broken[a] = broken[b] = {2}
    argv = []
    order = draw(st.permutations(sorted(values)))
    for opt in order:
        value = values[opt]
        if value is None:
            argv.append(opt)
        elif isinstance(value, tuple):  # a flag given a value: --quiet=1
            argv.append(f"{opt}={value[1]}")
        elif draw(st.booleans()) or value.startswith("-") or value == "":
            argv.append(f"{opt}={value}")  # a value starting with "-" needs the = form
        else:
            argv += [opt, value]
    return argv, broken


def run(command: str, argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``python -m sals COMMAND ARGV`` run in-process with the
    stand-in loader; torch's thread count is put back."""
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    # the module loading.load will import from: building a model from a config (other tests)
    # can leave another transformers module object in sys.modules than the one imported here
    transformers = importlib.import_module("transformers")  # sys.modules' entry
    saved = transformers.AutoTokenizer, transformers.AutoModelForCausalLM
    transformers.AutoTokenizer = transformers.AutoModelForCausalLM = _Loader
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = entry.main([command, *argv])
            except SystemExit as e:
                status = e.code
    finally:
        transformers.AutoTokenizer, transformers.AutoModelForCausalLM = saved
        torch.set_num_threads(threads)
    return status, out.getvalue(), err.getvalue()


def check(command: str, argv: list[str], broken: dict) -> None:
    CALLS.clear()
    status, out, err = run(command, argv)
    if "--debug" not in argv:  # --debug: the traceback instead of one line, as asked
        assert "Traceback" not in err + out, err
    if not broken:
        assert CALLS, f"{argv}: refused ({status}): {err}"
        assert status == 1 and "the model loader was reached" in err.splitlines()[-1], \
            (status, err)
        return
    assert not CALLS, f"{argv}: the model loader ran for a broken command line"
    allowed = set().union(*broken.values())
    assert status in allowed, f"{argv}: exit status {status}, expected {allowed}: {err}"
    assert any(named(opt, err) for opt in broken), \
        f"{argv}: the message names none of {sorted(broken)}: {err!r}"


@FUZZ
@given(command_lines("eval"))
def test_eval_command_lines(case):
    check("eval", *case)


@FUZZ
@given(command_lines("calibrate"))
def test_calibrate_command_lines(case):
    check("calibrate", *case)


def _each_bad_value():
    for command, table in (("eval", EVAL), ("calibrate", CALIBRATE)):
        for opt, spec in table.items():
            for value, statuses in (spec[1] if spec is not None else []):
                yield command, opt, value, statuses


@pytest.mark.parametrize("command, option, value, statuses", list(_each_bad_value()))
def test_every_bad_value_alone_is_a_usage_error(command, option, value, statuses):
    """Each wrong value of the tables above on an otherwise valid command line (the fuzz draws
    some of them; this names every one): refused before the model is loaded, naming the
    option. Ranges included: --threads -1, --rank-frac 0, --calibration-query-weight 5, ...
    used to pass the parser and fail after the model had loaded (or run on)."""
    table = EVAL if command == "eval" else CALIBRATE
    values = {opt: table[opt][0][0] for opt in REQUIRED[command] + ALWAYS[command]}
    values[option] = value
    check(command, [f"{o}={v}" for o, v in values.items()], {option: statuses})
