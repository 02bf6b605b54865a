"""Fixtures of the retrieval tests: the real embedder (loaded once), tiny corpora, and a fresh database per test
on SQLite and on a real PostgreSQL (a schema of its own, dropped afterwards; see tests/db/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from helpers import POSTGRES_URL, migrated_schema, require_postgres
from mini_claude.db import init_db, make_engine
from mini_claude.encoder import Encoder


@pytest.fixture(scope="session")
def minilm() -> Encoder:
    return Encoder.load(precision="fp32")  # the same rankings on every CPU (bf16 is tested in test_encoder)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'rag.sqlite'}")
        init_db(engine)
        try:
            yield engine
        finally:
            engine.dispose()
        return
    require_postgres()
    with migrated_schema(POSTGRES_URL, "mc_rag") as engine:
        yield engine


CORPUS = {
    "cooking/bread.md": (
        "# Baking bread\n\nKnead the dough for ten minutes until it is smooth and elastic.\n\n"
        "## Proofing\n\nLet the dough rise in a warm place until it doubles in size, about an hour.\n\n"
        "## Baking\n\nBake the loaf at 220 degrees Celsius for thirty minutes until the crust is golden brown.\n"
    ),
    "cooking/soup.txt": "Tomato soup: simmer chopped tomatoes with onions and garlic, then blend until smooth.\n",
    "space/planets.rst": (
        "Planets\n=======\n\nJupiter is the largest planet in the solar system, a gas giant with a great red storm.\n\n"
        "Mars\n----\n\nMars is a cold desert world with the tallest volcano known, Olympus Mons.\n"
    ),
    "space/notes.html": (
        "<html><head><title>x</title><script>var hidden = 1;</script></head><body><h1>Telescopes</h1>"
        "<p>A refracting telescope gathers light with a lens; a reflector uses a curved mirror.</p></body></html>"
    ),
    "data/facts.jsonl": '{"animal": "octopus", "fact": "An octopus has three hearts and blue blood."}\n',
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for name, content in CORPUS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root
