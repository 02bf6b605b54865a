"""Configuration's one home: `Settings`, read from `MINI_CLAUDE_*` environment variables and a `.env` file.

Command-line flags override these per run; everything that has a default for the whole installation lives here.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mini_claude.upstream import UpstreamConfig, check_unique, parse_upstreams


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MINI_CLAUDE_", env_file=".env", extra="ignore")

    model: str | None = Field(None, description="Default model: a .gguf file, a model dir, or a name from `models`.")
    model_paths: list[str] = Field(default_factory=list, description="Extra model files/dirs listed by `models`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Decoding on a CPU is bound by bytes of weights read per token, so low-bit weights are what make it fast.
    # "auto": int4 when the file is 4-bit already (the bundled one), int8 otherwise; "none" keeps dense weights
    # (exact reference numerics).
    quantize: Literal["auto", "none", "int8", "int4"] = "auto"
    threads: int | None = Field(None, ge=1, description="Torch intra-op threads (default: torch's choice).")
    max_tokens: int = Field(512, ge=1, description="Default cap on generated tokens per reply.")
    system_prompt: str | None = None
    memory_max_turns: int = Field(20, ge=1)

    # ---------------------------------------------------------------------------------------- the server
    database_url: str = Field(
        "sqlite:///./mini_claude.db",
        description="Where conversations are stored: SQLite by default, e.g. postgresql+psycopg://user@host/db.",
    )
    # NoDecode: the variable is a plain comma-separated list ("key1,key2"), not JSON; see `_split_keys`.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="If set, every route but /health (docs, UI too) needs `Authorization: Bearer <one of these>`.",
    )
    max_request_bytes: int = Field(
        8 * 2**20, ge=1, description="Largest request body accepted; a larger one is a 413 before it is parsed."
    )
    job_lease_s: float = Field(
        30.0, gt=0, description="A running fine-tune job whose runner sent no heartbeat for this long is taken over."
    )
    host: str = "127.0.0.1"  # loopback: exposing the server is a decision, not a default
    port: int = Field(8000, ge=0, le=65535)
    max_batch_size: int = Field(8, ge=1, le=256, description="Sequences decoded together by the scheduler.")
    ui: bool = Field(True, description="Mount the web UI at /ui (when its dependencies are installed).")
    prefix_cache_mb: float = Field(
        64.0, ge=0, description="Memory for prompt keys/values kept for reuse after their requests end (MiB)."
    )
    prefix_cache_tokens: int | None = Field(
        None, ge=0, description="The same budget in prompt positions; when set, it overrides prefix_cache_mb."
    )
    response_cache_size: int = Field(
        0, ge=0, description="Deterministic replies (temperature 0 or a seed) kept for identical requests; 0: off."
    )
    # NoDecode: a comma-separated list like api_keys ("support=runs/a/adapter,runs/b/adapter").
    adapters: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="LoRA adapter dirs (DIR or NAME=DIR) the server loads, each served as its own model.",
    )
    fine_tune_dir: str = Field(
        "./fine-tunes", description="Where jobs from POST /v1/fine-tunes write their runs (one dir per job)."
    )
    models_dir: str | None = Field(
        "./models",
        description="scikit-learn models (*.skops) served by /predict and KServe V2 beside the bundled ones, "
        "by file name; a changed file is reloaded on its next request.",
    )
    prediction_log_queue: int = Field(
        10_000, ge=1, description="Predictions waiting to be written to the database; beyond it they are dropped."
    )

    # NoDecode: a JSON list, a YAML/JSON file's path, or preset names ("openai,ollama"); see upstream.py.
    upstreams: Annotated[list[UpstreamConfig], NoDecode] = Field(
        default_factory=list,
        description='OpenAI-compatible remote backends, served as UPSTREAM/MODEL: [{"name", "base_url", '
        '"api_key_env", "models"}], a YAML file of the same, or preset names (openai, gemini, anthropic, ollama, '
        "vllm).",
    )
    agents_dir: str = Field(
        "./agents", description="Agent definitions (NAME.yaml) the server loads into the database when it starts."
    )

    # ----------------------------------------------------------------------------------------- voice
    tts_engine: Literal["hibari", "espeak-ng", "piper", "elevenlabs"] = Field(
        "hibari", description="The speech engine OpenAI's model names (tts-1, gpt-4o-mini-tts) select."
    )
    rag_index_dir: str = Field(
        "./rag-index", description="Where the HNSW graphs of large knowledge collections are kept (one file each)."
    )
    embed_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="The embedder's compute precision: auto is bf16 where the CPU has native bf16 (AVX512_BF16, "
        "AMX), else fp32 (the exact reference).",
    )
    audio_cache_dir: str = Field("./audio-cache", description="Where synthesized speech is cached on disk.")
    audio_cache_max_mb: float = Field(256, ge=0, description="Most megabytes the audio cache holds (0: no cache).")
    audio_threads: int = Field(1, ge=1, le=64, description="CPU threads of the speech engine's ONNX runtime.")
    # ElevenLabs' own variable name (its SDK reads the same one); MINI_CLAUDE_ELEVENLABS_API_KEY works too.
    elevenlabs_api_key: str | None = Field(
        None, validation_alias=AliasChoices("ELEVENLABS_API_KEY", "MINI_CLAUDE_ELEVENLABS_API_KEY"), repr=False
    )
    elevenlabs_base_url: str | None = Field(None, description="ElevenLabs' API root (default: the service's own).")
    elevenlabs_model: str = "eleven_multilingual_v2"

    @field_validator("upstreams", mode="before")
    @classmethod
    def _read_upstreams(cls, value: Any) -> Any:
        return parse_upstreams(value)

    @field_validator("upstreams")
    @classmethod
    def _unique_upstreams(cls, value: list[UpstreamConfig]) -> list[UpstreamConfig]:
        return check_unique(value)

    @field_validator("api_keys", "adapters", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        """Accept comma-separated lists (`MINI_CLAUDE_API_KEYS=a,b`) and JSON lists; blanks are dropped, so `""`
        means no keys (no auth) and no adapters."""
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, list | tuple):
            return [str(k).strip() for k in value if str(k).strip()]
        return value
