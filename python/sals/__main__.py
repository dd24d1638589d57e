"""``python -m sals demo | calibrate | bench ...``: dispatch to the subcommand's module."""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "demo": ("sals.demo", "generate with a real model, dense vs SALS, and report memory"),
    "calibrate": ("sals.hf.calibrate_cli", "calibrate a HuggingFace model's projections"),
    "bench": ("sals.bench", "time the attention operator (e.g. `bench attention`)"),
    "eval": ("sals.eval.cli", "accuracy of SALS settings vs dense and baselines (RULER-style)"),
}


def _usage() -> str:
    lines = ["usage: python -m sals COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"sals: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = _COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only a missing subcommand module is reported this way; a missing dependency of it
        # (transformers, torch) names that dependency instead.
        if e.name not in (module_name, module_name.rsplit(".", 1)[0]):
            print(f"sals {command}: needs the Python package {e.name!r} "
                  f"(install sals with the [hf] extra: pip install 'sals[hf]')", file=sys.stderr)
            return 1
        print(f"sals {command}: this installation has no {module_name} module", file=sys.stderr)
        return 1
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
