"""Configuration's one home: `Settings`, read from `MINI_CLAUDE_*` environment variables and a `.env` file.

Command-line flags override these per run; everything that has a default for the whole installation lives here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
