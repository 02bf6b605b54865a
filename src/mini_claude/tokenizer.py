"""Text <-> token ids, the chat template, and streaming detokenization.

The BPE itself is the `tokenizers` library; what lives here is building it from what a checkpoint carries:

- a GGUF file stores the vocabulary, merges, token types and special ids as metadata under llama.cpp's key
  names (`tokenizer.ggml.*`), plus a pre-tokenizer name (`tokenizer.ggml.pre`) that says how text is split
  before merging. We rebuild an equivalent `tokenizers.Tokenizer` from those;
- a Hugging Face dir carries `tokenizer.json` (loaded as is) and `tokenizer_config.json` (chat template,
  special tokens, BOS rule).

The chat template is the model's own Jinja program, rendered in a sandbox the way `transformers` does
(`trim_blocks`, `lstrip_blocks`), so prompts are byte-identical to the reference.

Streaming: decoding one token at a time is wrong for byte-level BPE (a multi-byte character can span tokens)
and for SentencePiece (leading-space rules depend on context). `IncrementalDetokenizer` decodes a small
window of recent tokens twice and emits only the stable difference, never half a character.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BPETokenizer

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# How each GGUF `tokenizer.ggml.pre` splits text before BPE. These are the splitting rules the vocabularies
# were trained with (the same regexes llama.cpp and the original tokenizer.json files use).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM splits every digit apart, then applies GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre or "")
    if split is None:  # "gpt2", "default", missing: GPT-2's own regex
        return byte_level
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, the alphabet byte-level vocabularies use."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """SentencePiece GGUFs store scores, not merges: a token's score ranks the merge that produces it."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


class ChatTemplate:
    """A model's Jinja chat template, rendered like `transformers.apply_chat_template`."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        self.source = source
        self._template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )


# Used only when a checkpoint has no template of its own (e.g. base GPT-2): ChatML, the most common format.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """BPE tokenizer plus the facts generation needs: BOS rule, end-of-turn ids, chat template."""

    def __init__(
        self,
        backend: BPETokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_eos_tokens: Iterable[str] = (),
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos = add_bos and bos_token is not None
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None
        # Generation ends on any of these: the declared EOS and the template's end-of-turn marker if it differs.
        self.stop_ids = {i for i in [self.eos_id, *map(backend.token_to_id, extra_eos_tokens)] if i is not None}
        self.chat_template_source = chat_template
        self.chat_template = ChatTemplate(chat_template or DEFAULT_CHAT_TEMPLATE, bos_token or "", eos_token or "")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become their ids.

        `encode_batch` of one text gives what `encode` gives, but releases the GIL while it runs (`encode` holds
        it: a 1 MB prompt would freeze every other thread of the process, the server's event loop included).
        """
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        add = self.add_bos if add_bos is None else add_bos
        if add and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Render the conversation with the model's own template and tokenize it.

        The BOS token is added only if the template did not write it itself (as Llama 3's does). `tools`
        (OpenAI's tool objects) reach the template as `tools`, as in `transformers`; only templates that
        `knows_tools` do anything with them.
        """
        extra = {"tools": list(tools)} if tools else {}
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **extra)
        return self.encode(text)

    @property
    def knows_tools(self) -> bool:
        """Whether the chat template renders tool definitions (it reads a `tools` variable)."""
        return "tools" in (self.chat_template_source or "")

    # ---------------------------------------------------------------------------------------- builders
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
        kind = meta.get("tokenizer.ggml.model")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        if kind == "gpt2":
            alphabet = set(_bytes_to_unicode().values())
            spell = _bytes_to_unicode()
            # Tokens outside the byte alphabet (rare, mislabelled specials) are re-spelled byte by byte.
            vocab_tokens = [t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()) for t in tokens]
            vocab = {t: i for i, t in enumerate(vocab_tokens)}
            merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
            backend = BPETokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))  # type: ignore[arg-type]
            backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
            backend.decoder = decoders.ByteLevel()
        elif kind == "llama":  # SentencePiece BPE with byte fallback (Llama 2, TinyLlama, Mistral v0.1)
            vocab = {t: i for i, t in enumerate(tokens)}
            scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
            unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
            backend = BPETokenizer(
                models.BPE(
                    vocab,
                    _merges_from_scores(tokens, scores),
                    unk_token=tokens[unk_id],
                    fuse_unk=True,
                    byte_fallback=True,
                )
            )
            prefix = [normalizers.Prepend("▁")] if meta.get("tokenizer.ggml.add_space_prefix", True) else []
            backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
            strip = [decoders.Strip(" ", 1, 0)] if prefix else []
            backend.decoder = decoders.Sequence(
                [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
            )
        else:
            raise ValueError(
                f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2' BPE, 'llama' SentencePiece)"
            )
        control = [t for t, ty in zip(tokens, types, strict=True) if ty == CONTROL]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        user = [t for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED]
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        eos = token("eos_token_id")
        extra = [t for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>") if t in control and t != eos]
        return cls(
            backend,
            bos_token=token("bos_token_id"),
            eos_token=eos,
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_tokens=extra,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` (+ `generation_config.json`) as HF writes them."""
        path = Path(path)
        backend = BPETokenizer.from_file(str(path / "tokenizer.json"))
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())

        def name(value: Any) -> str | None:  # special tokens may be strings or AddedToken dicts
            return value.get("content") if isinstance(value, dict) else value

        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        extra: list[str] = []
        if (path / "generation_config.json").exists():
            gen = json.loads((path / "generation_config.json").read_text())
            ids = gen.get("eos_token_id")
            for i in ids if isinstance(ids, list) else [ids] if ids is not None else []:
                if (tok := backend.id_to_token(i)) is not None:
                    extra.append(tok)
        for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            if template and t in template and backend.token_to_id(t) is not None:
                extra.append(t)
        return cls(
            backend,
            bos_token=name(cfg.get("bos_token")),
            eos_token=name(cfg.get("eos_token")),
            add_bos=bool(cfg.get("add_bos_token", False)),
            chat_template=template,
            extra_eos_tokens=extra,
        )

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` in Hugging Face's layout."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        eos_extra = sorted(self.backend.id_to_token(i) for i in self.stop_ids if i != self.eos_id)
        cfg = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template_source,
            "extra_eos_tokens": eos_extra,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        gen = {"eos_token_id": sorted(self.stop_ids)}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2))


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces, each a whole number of characters.

    Keeps two offsets into the ids: `prefix` (start of a short context window) and `read` (end of what was
    emitted). Each step decodes window[prefix:read] and window[prefix:], and emits the difference once it no
    longer ends in U+FFFD, the replacement character a decoder writes for an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], self.skip_special_tokens)
        after = decode(self.ids[self.prefix :], self.skip_special_tokens)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], self.skip_special_tokens)
        after = decode(self.ids[self.prefix :], self.skip_special_tokens)
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
