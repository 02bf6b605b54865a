"""`mini-claude` / `python -m mini_claude`: a table of subcommands, each a plain function in `cli.py`.

Flags come from the functions' signatures and docstrings (jsonargparse); `--config FILE.yaml` reads the
same keys from YAML. Both `--max-tokens` and `--max_tokens` spellings work. User mistakes (bad flags,
missing or damaged model files, prompts that do not fit) print one line on stderr and exit non-zero;
set MINI_CLAUDE_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mini_claude import cli


def _normalize_flags(argv: Sequence[str]) -> list[str]:
    """Accept `--max-tokens` as well as jsonargparse's `--max_tokens`."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def build_parser(commands: dict[str, Callable[..., Any]]) -> Any:
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="mini-claude", description=__doc__.splitlines()[0], exit_on_error=False)
    subcommands = parser.add_subcommands(dest="command")
    for name, fn in commands.items():
        sub = ArgumentParser(prog=f"mini-claude {name}", exit_on_error=False)
        sub.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these flags as keys")
        flags = {n for n, p in inspect.signature(fn).parameters.items() if p.annotation in (bool, "bool")}
        sub.add_function_arguments(fn, skip=flags, as_positional=True)
        for flag in sorted(flags):  # booleans are switches: --json / --no_json
            default = inspect.signature(fn).parameters[flag].default
            sub.add_argument(f"--{flag}", action=ActionYesNo, default=bool(default), help=_param_help(fn, flag))
        subcommands.add_subcommand(name, sub, help=(fn.__doc__ or "").strip().splitlines()[0])
    return parser


def _param_help(fn: Callable[..., Any], name: str) -> str:
    for line in (fn.__doc__ or "").splitlines():
        if line.strip().startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return ""


def _user_errors() -> tuple[type[BaseException], ...]:
    from argparse import ArgumentError

    from pydantic import ValidationError

    from mini_claude.adapters import AdapterError
    from mini_claude.chat.memory import ConversationFileError
    from mini_claude.checkpoint import CheckpointError
    from mini_claude.eval.evaluate import EvaluationError
    from mini_claude.generate import ContextOverflowError
    from mini_claude.train.data import DataError
    from mini_claude.train.trainer import TrainingError

    return (
        ArgumentError, ValidationError, CheckpointError, ContextOverflowError, ConversationFileError, cli.UserError,
        DataError, TrainingError, EvaluationError, AdapterError,
    )  # fmt: skip


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or exc.__class__.__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = _normalize_flags(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(cli.COMMANDS)
        cfg = parser.parse_args(args)
        if not cfg.get("command"):
            parser.print_help()
            return 2
        command = cfg.command
        kwargs = {k: v for k, v in cfg[command].as_dict().items() if k != "config"}
        cli.COMMANDS[command](**kwargs)
    except _user_errors() as exc:
        if os.environ.get("MINI_CLAUDE_DEBUG"):
            raise
        print(f"mini-claude: error: {_one_line(exc)}", file=sys.stderr)
        return 2 if exc.__class__.__name__ == "ArgumentError" else 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `mini-claude generate ... | head -1`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
