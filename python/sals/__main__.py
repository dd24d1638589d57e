"""``python -m sals [--debug] demo | calibrate | bench ...``: dispatch to the subcommand's module.

An error in a command is reported as one line on stderr with exit status 1; ``--debug``
(before the command, or among its options) prints the full traceback instead.
"""

from __future__ import annotations

import importlib
import sys

from .tools import _cli

_COMMANDS = {
    "demo": ("sals.tools.demo", ("generate with a real model (SmolLM2), dense vs SALS, and "
                                 "compare answers, KV-cache bytes and speed")),
    "calibrate": ("sals.tools.calibrate", ("calibrate a local HuggingFace model and write its "
                                           "projection file")),
    "bench": ("sals.tools.bench", "benchmarks on a GPU (`bench attention`: the decode operator; `bench e2e`: generate)"),
    "eval": ("sals.tools.eval.cli", "accuracy of SALS settings vs dense and baselines (RULER-style)"),
}


def _usage() -> str:
    lines = ["usage: python -m sals [--debug] COMMAND [ARGS...]", "",
             "commands (`python -m sals COMMAND --help` for each one's options):"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in _COMMANDS.items()]
    lines += ["", "options:",
              "  -h, --help  show this message",
              "  --debug     on an error, print the full traceback instead of one line"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while argv and argv[0] == "--debug":
        debug = True
        argv.pop(0)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"sals: unknown command {command!r} (commands: {', '.join(_COMMANDS)}; "
              f"see python -m sals --help)", file=sys.stderr)
        return 2
    # Per-command --debug: each command's parser accepts it; it applies from the start.
    debug = debug or "--debug" in rest[:rest.index("--") if "--" in rest else len(rest)]
    module_name = _COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name in (module_name, module_name.rsplit(".", 1)[0]):
            print(f"sals {command}: this installation has no {module_name} module",
                  file=sys.stderr)
            return 1
        return _cli.report(command, e, debug)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        return _cli.report(command, e, debug)
    try:
        result = module.main(rest)
    except SystemExit:
        raise  # argparse: --help (0) and usage errors (2), already printed
    except BaseException as e:  # noqa: BLE001 - including KeyboardInterrupt
        return _cli.report(command, e, debug)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
