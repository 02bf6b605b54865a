"""The `mini-claude` command: end to end on the bundled model in real processes, and its error paths.

Slow tests start `python -m mini_claude` as a user would (each loads SmolLM2 in a few seconds, so there are
few of them, and independent runs start together). Their results are checked against the package's own
tokenizer (`--raw` ids, chat-template ids) and against each other (plain output == `--json` text, a
`--stop` run == the unstopped text cut at the stop string, the same `--seed` == the same tokens).

Error paths run in-process through `__main__.main` (fast, same code path as the console script), and a
few again in real processes to prove that no traceback ever reaches the terminal.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import save_tiny_model_dir
from mini_claude.__main__ import main
from mini_claude.catalog import BUNDLED_NAME
from mini_claude.checkpoint import read_gguf
from mini_claude.tokenizer import Tokenizer

ERROR_PREFIX = "mini-claude: error:"
GREETING = "Hello! Who are you?"
GREEDY_ARGS = ["--temperature", "0", "--max-tokens", "12"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MINI_CLAUDE_* settings from the developer's shell or a .env file in the repository."""
    for key in list(os.environ):
        if key.startswith("MINI_CLAUDE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINI_CLAUDE_")}
    env.update(COLUMNS="200", PYTHONUNBUFFERED="1", **extra)
    return env


def start(args: list[str], console_script: bool = False, **kwargs: Any) -> subprocess.Popen[str]:
    """Start `python -m mini_claude ARGS` (or the installed `mini-claude` script) with pipes."""
    command = (
        [str(Path(sys.executable).parent / "mini-claude")] if console_script else [sys.executable, "-m", "mini_claude"]
    )
    return subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=kwargs.pop("env", cli_env()),
        **kwargs,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return finish(start(args, **kwargs))


def run_json(args: list[str]) -> dict[str, Any]:
    result = run_cli(["generate", *args, "--json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_one_error_line(rc: int, stdout: str, stderr: str, contains: str = "") -> str:
    """Non-zero exit, no traceback, and stderr ends with the one line `mini-claude: error: ...`.

    Only load progress ("Loading X ...", "X: N parameters ... loaded in 1.0s") may come before it.
    """
    assert rc != 0
    assert "Traceback" not in stderr and "Traceback" not in stdout
    *before, last = stderr.splitlines() or [""]
    assert last.startswith(ERROR_PREFIX), stderr
    assert all(line.startswith("Loading ") or "loaded in" in line for line in before), stderr
    assert contains in last
    return last


@pytest.fixture(scope="module")
def bundled_tokenizer(bundled_gguf: Path) -> Tokenizer:
    meta, _ = read_gguf(bundled_gguf)
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model dir (256-token context) with a byte-level tokenizer: loads in a blink."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


# ------------------------------------------------------------------------------ in-process, fast


def test_generate_on_a_tiny_model(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", "--model", str(tiny_dir), "--quantize", "none", "--json", "--max_tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "tiny" and result["completion_tokens"] == 4 and result["finish_reason"] == "length"


def test_generate_with_an_adapter(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--adapter` serves the adapter through the engine's per-row path; the reference is the training-side
    `LoRALinear` (a separate implementation) on the same dense model."""
    from mini_claude.checkpoint import load_model
    from mini_claude.engine import Engine
    from mini_claude.generate import SamplingParams
    from mini_claude.lora import LoRAConfig, apply_lora, save_adapter

    model, tokenizer, _ = load_model(tiny_dir, torch.float32, quantize="none")
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = save_adapter(model, tmp_path / "runs" / "tuned" / "adapter")
    argv = [
        "generate",
        "hi",
        "--model",
        str(tiny_dir),
        "--quantize",
        "none",
        "--dtype",
        "float32",
        "--json",
        "--max_tokens",
        "8",
    ]

    assert main([*argv, "--adapter", str(adapter_dir)]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)

    reference = Engine(model.eval(), tokenizer).complete(tuned["prompt_ids"], SamplingParams(8, temperature=0.0))
    assert (tuned["model"], tuned["base_model"], plain["model"]) == ("tuned", "tiny", "tiny")
    assert tuned["completion_ids"] == reference.completion_ids != plain["completion_ids"]


@pytest.fixture(scope="module")
def truncated_gguf(bundled_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "half.gguf"
    with bundled_gguf.open("rb") as src, path.open("wb") as dst:
        dst.write(src.read(bundled_gguf.stat().st_size // 2))
    return path


def error_cases(tmp: Path, tiny_dir: Path, truncated: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """name -> (argv, environment, text the error line must contain); files live under `tmp` (see below)."""
    huge = "lorem ipsum " * 200  # ~2400 byte tokens for a 256-token model
    return {
        "missing model": (["generate", "hi", "--model", str(tmp / "nope.gguf")], {}, "model not found"),
        "truncated gguf": (["generate", "hi", "--model", str(truncated)], {}, "not a readable GGUF file"),
        "not a gguf": (["generate", "hi", "--model", str(tmp / "notes.txt")], {}, "is not a GGUF file"),
        "dir without config": (["generate", "hi", "--model", str(tmp / "empty_dir")], {}, "has no config.json"),
        "bad config json": (["generate", "hi", "--model", str(tmp / "bad_config")], {}, "is not valid JSON"),
        "negative temperature": (["generate", "hi", "--temperature", "-1"], {}, "temperature must be between"),
        "temperature not a number": (["generate", "hi", "--temperature", "abc"], {}, "temperature"),
        "top_p zero": (["generate", "hi", "--top-p", "0"], {}, "top_p must be in (0, 1]"),
        "max tokens zero": (["generate", "hi", "--max-tokens", "0"], {}, "max_new_tokens must be at least 1"),
        "unknown flag": (["generate", "hi", "--bogus", "1"], {}, "--bogus"),
        "unknown chat flag": (["chat", "--no-such-flag"], {}, "--no_such_flag"),
        "unknown command": (["frobnicate"], {}, "frobnicate"),
        "missing prompt": (["generate"], {}, "prompt"),
        "prompt too long": (
            ["generate", huge, "--raw", "--model", str(tiny_dir), "--quantize", "none"],
            {},
            "the context window holds 256",
        ),
        "prompt too long, json": (
            ["generate", huge, "--model", str(tiny_dir), "--quantize", "none", "--json"],
            {},
            "the context window holds 256",
        ),
        "model setting missing": (["generate", "hi"], {"MINI_CLAUDE_MODEL": "/nonexistent"}, "/nonexistent"),
        "missing adapter": (
            ["generate", "hi", "--model", str(tiny_dir), "--quantize", "none", "--adapter", str(tmp / "no-adapter")],
            {},
            "adapter dir not found",
        ),
        "dir that is not an adapter": (
            ["generate", "hi", "--model", str(tiny_dir), "--adapter", str(tmp / "empty_dir")],
            {},
            "is not an adapter dir",
        ),
        "bad quantize setting": (["generate", "hi"], {"MINI_CLAUDE_QUANTIZE": "int3"}, "quantize"),
    }


ERROR_NAMES = [
    pytest.param(name, marks=pytest.mark.slow) if name == "truncated gguf" else name  # parses 50 MB of GGUF
    for name in error_cases(Path("/x"), Path("/x"), Path("/x"))
]


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_user_errors_print_one_line(
    name: str,
    tmp_path: Path,
    tiny_dir: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "bad_config").mkdir()
    (tmp_path / "bad_config" / "config.json").write_text("{oops")
    truncated = request.getfixturevalue("truncated_gguf") if name == "truncated gguf" else tmp_path / "unused"
    argv, env, contains = error_cases(tmp_path, tiny_dir, truncated)[name]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc = main(argv)
    captured = capsys.readouterr()
    line = assert_one_error_line(rc, captured.out, captured.err, contains)
    if "--json" in argv or name in ("negative temperature", "unknown flag", "missing model"):
        assert captured.err.splitlines() == [line]  # nothing else at all: not even load progress


def test_prompt_that_fits_only_with_truncate(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    huge = "lorem ipsum " * 30  # 360 byte tokens for a 256-token model
    argv = ["generate", huge, "--raw", "--model", str(tiny_dir), "--quantize", "none", "--max-tokens", "2"]
    assert main([*argv, "--truncate", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] == 255 and result["truncated_prompt_tokens"] == 360 - 255


def test_empty_raw_prompt_is_a_user_error(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        rc = main(["generate", "", "--raw", "--model", str(tiny_dir), "--quantize", "none"])
    except Exception as exc:  # what a user would see as a traceback
        pytest.fail(f"traceback: {exc!r}")
    captured = capsys.readouterr()
    assert_one_error_line(rc, captured.out, captured.err, "empty")


def test_config_json_that_is_not_an_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    try:
        rc = main(["generate", "hi", "--model", str(tmp_path / "m")])
    except Exception as exc:
        pytest.fail(f"traceback: {exc!r}")
    captured = capsys.readouterr()
    assert_one_error_line(rc, captured.out, captured.err, "config.json")


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("chat", "generate", "models"))
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--max_tokens" in out and "--temperature" in out and "--json" in out


# ------------------------------------------------------------------------- real processes, bundled model


@pytest.fixture(scope="module")
def greedy_reply() -> dict[str, Any]:
    """`generate GREETING --json`, greedy: the reference the other end-to-end runs are checked against."""
    return run_json([GREETING, *GREEDY_ARGS])


@pytest.mark.slow
def test_generate_json_fields(greedy_reply: dict[str, Any], bundled_tokenizer: Tokenizer) -> None:
    r = greedy_reply
    assert r["model"] == BUNDLED_NAME
    for key, kind in [("text", str), ("prompt_ids", list), ("completion_ids", list), ("prompt_tokens", int),
                      ("completion_tokens", int), ("finish_reason", str), ("ttft_ms", float),
                      ("decode_tokens_per_s", float)]:  # fmt: skip
        assert isinstance(r[key], kind), key
    assert r["prompt_ids"] == bundled_tokenizer.apply_chat_template([{"role": "user", "content": GREETING}])
    assert r["prompt_tokens"] == len(r["prompt_ids"])
    assert r["completion_tokens"] == len(r["completion_ids"]) == 12 and r["finish_reason"] == "length"
    assert r["text"] == bundled_tokenizer.decode(r["completion_ids"]) and r["text"].strip()
    assert r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_generate_prints_the_same_text(greedy_reply: dict[str, Any]) -> None:
    """Plain output streams the very text `--json` reports (and `--max_tokens` == `--max-tokens`)."""
    result = run_cli(["generate", GREETING, "--temperature", "0", "--max_tokens", "12"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_reply["text"] + "\n"
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_generate_stop_string(greedy_reply: dict[str, Any]) -> None:
    text = greedy_reply["text"]
    words = text.split()
    stop = " ".join(words[2:4])  # two words from the middle: several tokens
    assert stop and text.find(stop) > 0
    r = run_json([GREETING, *GREEDY_ARGS, "--stop", stop])
    assert r["text"] == text[: text.find(stop)]
    assert r["finish_reason"] == "stop"
    assert r["completion_ids"] == greedy_reply["completion_ids"][: r["completion_tokens"]]


@pytest.mark.slow
def test_seed_repeats_sampling_exactly(greedy_reply: dict[str, Any]) -> None:
    args = [GREETING, "--temperature", "1.5", "--max-tokens", "12", "--seed", "1234", "--json"]
    first, again = (finish(p) for p in [start(["generate", *args]), start(["generate", *args])])
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    first_r, again_r = json.loads(first.stdout), json.loads(again.stdout)
    assert first_r["completion_ids"] == again_r["completion_ids"] and first_r["text"] == again_r["text"]
    assert first_r["completion_ids"] != greedy_reply["completion_ids"]  # temperature really samples


@pytest.mark.slow
def test_raw_skips_the_chat_template(bundled_tokenizer: Tokenizer) -> None:
    prompt = "The capital of France is"
    r = run_json([prompt, "--raw", "--temperature", "0", "--max-tokens", "4"])
    assert r["prompt_ids"] == bundled_tokenizer.encode(prompt)
    assert bundled_tokenizer.backend.token_to_id("<|im_start|>") not in r["prompt_ids"]
    assert r["completion_tokens"] >= 1


@pytest.mark.slow
def test_models_lists_the_bundled_model(bundled_gguf: Path) -> None:
    table, listing = finish(start(["models"], console_script=True)), finish(start(["models", "--json"]))
    assert table.returncode == listing.returncode == 0
    assert BUNDLED_NAME in table.stdout and "bundled" in table.stdout
    entries = json.loads(listing.stdout)
    bundled = [e for e in entries if e["name"] == BUNDLED_NAME]
    assert len(bundled) == 1
    assert (
        bundled[0]["path"] == str(bundled_gguf) and bundled[0]["kind"] == "gguf" and bundled[0]["source"] == "bundled"
    )
    assert bundled[0]["size_mb"] == pytest.approx(bundled_gguf.stat().st_size / 2**20)


@pytest.mark.slow
def test_chat_through_stdin(tmp_path: Path, greedy_reply: dict[str, Any]) -> None:
    saved = tmp_path / "conversation.json"
    lines = [GREETING, "/system You answer in one word.", f"/save {saved}", "/reset", f"/load {saved}", "", "/exit"]
    args = ["chat", *GREEDY_ARGS, "--repetition-penalty", "1.0", "--top-p", "1.0"]
    proc = start(args, stdin=subprocess.PIPE)
    out, err = proc.communicate("\n".join(lines) + "\n", timeout=600)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert out.startswith(f"Chatting with {BUNDLED_NAME}.")
    assert greedy_reply["text"] in out  # the same reply `generate` gives to the same first message
    assert "[reply cut at the token limit]" in out
    for expected in ["(System prompt set.)", f"(Saved 2 messages to {saved}.)", "(Conversation cleared.)",
                     f"(Loaded 2 messages from {saved}.)", "(Type a message, or /help for commands.)"]:  # fmt: skip
        assert expected in out
    assert out.index("(Conversation cleared.)") < out.index("(Loaded 2 messages")
    data = json.loads(saved.read_text())
    assert data["system_prompt"] == "You answer in one word."
    assert data["messages"] == [
        {"role": "user", "content": GREETING},
        {"role": "assistant", "content": greedy_reply["text"]},
    ]


def read_until(proc: subprocess.Popen[str], sel: selectors.BaseSelector, buf: list[str], cond, timeout: float) -> str:
    """Read the child's stdout (non-blocking) until `cond(text so far)` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond("".join(buf)):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"timed out or exited (rc={proc.poll()}) waiting; stdout so far: {''.join(buf)!r}")
        for key, _ in sel.select(timeout=0.5):
            data = os.read(key.fd, 4096)
            if data:
                buf.append(data.decode(errors="replace"))
    return "".join(buf)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_stops_the_reply_and_the_chat_goes_on() -> None:
    # A terminal's Ctrl-C: the child must react to SIGINT even when this test runs in a background job (`make
    # test &`), whose children inherit SIGINT as ignored, and an ignored SIGINT never becomes KeyboardInterrupt.
    proc = start(
        ["chat", "--temperature", "0", "--max-tokens", "400"], stdin=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf: list[str] = []
    try:
        read_until(proc, sel, buf, lambda s: s.count(">>> ") >= 1, timeout=600)  # model loaded, prompt shown
        proc.stdin.write("Write a long story about a dragon and a knight, with many details.\n")
        proc.stdin.flush()
        before = len("".join(buf))
        # The reply has started once text beyond the prompt arrives.
        read_until(proc, sel, buf, lambda s: len(s[before:].strip()) >= 3, timeout=600)
        proc.send_signal(signal.SIGINT)
        out = read_until(proc, sel, buf, lambda s: "[stopped]" in s and s.count(">>> ") >= 2, timeout=120)
        assert proc.poll() is None, "the chat must survive Ctrl-C during a reply"
        assert "(Use /exit" not in out  # the interrupt landed in the reply, not at the prompt
        proc.stdin.write("/exit\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_errors_in_real_processes_have_no_traceback(tmp_path: Path, truncated_gguf: Path) -> None:
    cases = [
        (["generate", "hi", "--model", str(truncated_gguf)], cli_env(), "not a readable GGUF file"),
        (["generate", "hi", "--temperature", "abc"], cli_env(), "temperature"),
        (["generate", "hi", "--bogus"], cli_env(), "--bogus"),
        (["generate", "hi"], cli_env(MINI_CLAUDE_MODEL="/nonexistent"), "model not found: /nonexistent"),
    ]
    procs = [start(argv, env=env, cwd=tmp_path) for argv, env, _ in cases]
    for proc, (_, _, contains) in zip(procs, cases, strict=True):
        r = finish(proc)
        assert_one_error_line(r.returncode, r.stdout, r.stderr, contains)
        assert r.stdout == ""


@pytest.mark.parametrize(
    ("flag", "expected"),
    [("runs/a/adapter", ["runs/a/adapter"]), ("runs/a/adapter,support=runs/b", ["runs/a/adapter", "support=runs/b"]),
     ('["runs/a/adapter", "x=runs/b"]', ["runs/a/adapter", "x=runs/b"])],
)  # fmt: skip
def test_serve_takes_one_or_several_adapters(flag: str, expected: list[str]) -> None:
    """`serve --adapter` parses as a user types it, and reaches the settings as a list of specs."""
    from mini_claude.__main__ import build_parser
    from mini_claude.cli import COMMANDS
    from mini_claude.settings import Settings

    parsed = build_parser(COMMANDS).parse_args(["serve", "--adapter", flag]).serve.adapter
    assert Settings(_env_file=None, adapters=parsed).adapters == expected  # type: ignore[call-arg]


def test_command_groups_parse_to_their_function(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A table inside the command table is a group: `mini-claude GROUP COMMAND --flags` calls that function."""
    from mini_claude import __main__, cli

    calls: list[tuple[str, object]] = []

    def create(name: str, model: str | None = None) -> None:
        """Create one.

        Args:
            name: what to call it.
            model: the model it uses.
        """
        calls.append((name, model))

    monkeypatch.setitem(cli.COMMANDS, "thing", {"create": create})
    assert __main__.main(["thing", "create", "bob", "--model", "m"]) == 0
    assert calls == [("bob", "m")]
    assert __main__.main(["thing", "create"]) == 2  # a missing argument is a usage error, in one line
    assert capsys.readouterr().err.count("\n") == 1


def test_db_commands_create_report_and_undo_the_schema(tmp_path: Path, capsys) -> None:
    from mini_claude.__main__ import main
    from mini_claude.db import head_revision

    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["db", "upgrade", "--database_url", url]) == 0
    assert head_revision() in capsys.readouterr().out
    assert main(["db", "current", "--database_url", url]) == 0
    assert capsys.readouterr().out.startswith(f"database: {head_revision()};")
    assert main(["db", "downgrade", "base", "--database_url", url]) == 0
    assert main(["db", "current", "--database_url", url]) == 0
    assert "empty" in capsys.readouterr().out
    assert main(["db", "downgrade", "no-such-revision", "--database_url", url]) == 1
    assert capsys.readouterr().err.count("\n") == 1
