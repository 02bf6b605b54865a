"""`mini-claude` / `python -m mini_claude`: a table of subcommands, each a plain function (`cli.COMMANDS`).

A table entry is a function (`mini-claude generate ...`) or a table of its own for a group of commands
(`mini-claude agent create ...`); the functions may live in their own area's module.

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

SHORT_FLAGS = {"-o": "--output"}  # the few flags with a conventional one-letter form


def _normalize_flags(argv: Sequence[str]) -> list[str]:
    """Accept `--max-tokens` as well as jsonargparse's `--max_tokens`, and `-o FILE` for `--output FILE`."""
    out = []
    for arg in argv:
        arg = SHORT_FLAGS.get(arg, arg)
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


Commands = dict[str, "Callable[..., Any] | Commands"]


def build_parser(commands: Commands) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="mini-claude", description=__doc__.splitlines()[0], exit_on_error=False)
    _add_commands(parser, commands, "mini-claude")
    return parser


def _add_commands(parser: Any, commands: Commands, prog: str) -> None:
    # jsonargparse wants nested levels added top-down: a group joins its parent before it gets its own commands.
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    subcommands = parser.add_subcommands(dest="command")
    for name, entry in commands.items():
        if isinstance(entry, dict):  # a group: `mini-claude NAME SUBCOMMAND ...`
            group = ArgumentParser(prog=f"{prog} {name}", exit_on_error=False)
            subcommands.add_subcommand(name, group, help=f"{name} commands: {', '.join(entry)}")
            _add_commands(group, entry, f"{prog} {name}")
            continue
        fn = entry
        sub = ArgumentParser(prog=f"{prog} {name}", exit_on_error=False)
        sub.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these flags as keys")
        params = inspect.signature(fn).parameters
        flags = {n for n, p in params.items() if p.annotation in (bool, "bool")}
        # A required list of strings is a variadic positional: `mini-claude ingest a.md docs/ ...`.
        many = {n for n, p in params.items() if p.annotation in (list[str], "list[str]") and p.default is p.empty}
        sub.add_function_arguments(fn, skip=flags | many, as_positional=True)
        for positional in many:
            sub.add_argument(positional, nargs="+", help=_param_help(fn, positional))
        for flag in sorted(flags):  # booleans are switches: --json / --no_json
            default = inspect.signature(fn).parameters[flag].default
            sub.add_argument(f"--{flag}", action=ActionYesNo, default=bool(default), help=_param_help(fn, flag))
        subcommands.add_subcommand(name, sub, help=(fn.__doc__ or "").strip().splitlines()[0])


def _resolve(commands: Commands, cfg: Any) -> tuple[Callable[..., Any], dict[str, Any]] | None:
    """The function a parsed command line names, and its arguments; None when a group was given no subcommand."""
    name = cfg.get("command")
    if not name:
        return None
    entry, args = commands[name], cfg[name]
    if isinstance(entry, dict):
        return _resolve(entry, args)
    return entry, {k: v for k, v in args.as_dict().items() if k != "config"}


def _param_help(fn: Callable[..., Any], name: str) -> str:
    for line in (fn.__doc__ or "").splitlines():
        if line.strip().startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return ""


def _user_errors() -> tuple[type[BaseException], ...]:
    from argparse import ArgumentError

    from pydantic import ValidationError

    from mini_claude.adapters import AdapterError
    from mini_claude.agents import AgentError
    from mini_claude.chat.memory import ConversationFileError
    from mini_claude.checkpoint import CheckpointError
    from mini_claude.eval.evaluate import EvaluationError
    from mini_claude.generate import ContextOverflowError
    from mini_claude.train.data import DataError
    from mini_claude.train.trainer import TrainingError

    return (
        ArgumentError, ValidationError, CheckpointError, ContextOverflowError, ConversationFileError, cli.UserError,
        DataError, TrainingError, EvaluationError, AdapterError, AgentError,
    )  # fmt: skip


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or exc.__class__.__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = _normalize_flags(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(cli.COMMANDS)
        resolved = _resolve(cli.COMMANDS, parser.parse_args(args))
        if resolved is None:
            parser.print_help()
            return 2
        fn, kwargs = resolved
        fn(**kwargs)
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
