"""`/v1/files` and `/v1/vector_stores` through the official `openai` client against a real uvicorn: upload,
attach with background ingestion (polled to completion or failure), search with our citation fields, paging."""

from __future__ import annotations

from typing import Any

import pytest
from openai import OpenAI

pytestmark = pytest.mark.one_thread
BREAD = b"# Baking bread\n\nKnead the dough for ten minutes, let it rise for an hour, bake at 220 degrees.\n"
PLANETS = b"Planets\n=======\n\nJupiter is the largest planet in the solar system, a gas giant.\n"


@pytest.fixture(scope="module")
def client(live: Any) -> OpenAI:
    return OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_files_upload_list_page_retrieve_delete(client: OpenAI) -> None:
    made = [client.files.create(file=(f"f{i}.txt", f"file {i}".encode()), purpose="assistants") for i in range(3)]
    assert made[0].object == "file" and made[0].id.startswith("file-") and made[0].bytes == 6
    assert made[0].filename == "f0.txt" and made[0].purpose == "assistants"
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == [made[2].id, made[1].id] and first.has_more
    assert [f.id for f in client.files.list(limit=2, after=made[1].id).data][:1] == [made[0].id]
    assert [f.id for f in client.files.list(limit=1)][:3] == [m.id for m in made[::-1]]  # auto-paging with `after`
    assert client.files.retrieve(made[1].id).filename == "f1.txt"
    assert client.files.content(made[1].id).read() == b"file 1"
    assert client.files.delete(made[1].id).deleted
    with pytest.raises(Exception, match="404"):
        client.files.retrieve(made[1].id)


def test_vector_store_ingests_searches_and_cites(client: OpenAI) -> None:
    store = client.vector_stores.create(name="kitchen and sky")
    assert store.object == "vector_store" and store.id.startswith("vs_") and store.name == "kitchen and sky"
    bread = client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=("bread.md", BREAD))
    planets = client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=("planets.rst", PLANETS))
    broken = client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=("bad.pdf", b"%PDF-1 no"))
    assert (bread.status, planets.status, broken.status) == ("completed", "completed", "failed")
    assert broken.last_error is not None and "cannot read pdf" in broken.last_error.message

    results = client.vector_stores.search(store.id, query="Which planet is the largest?", max_num_results=2)
    top = results.data[0]
    assert top.file_id == planets.id and top.filename == "planets.rst" and top.score > 0
    assert top.content[0].type == "text" and "Jupiter" in top.content[0].text
    extra = top.model_extra or {}
    assert PLANETS.decode()[extra["start_char"] : extra["end_char"]] == top.content[0].text
    assert isinstance(extra["chunk_id"], int) and extra["page"] is None and extra["heading"] == "Planets"

    reranked = client.vector_stores.search(store.id, query="Which planet is the largest?", max_num_results=2,
                                           extra_body={"rerank": True})  # fmt: skip
    assert {r.file_id for r in reranked.data} == {r.file_id for r in results.data}  # the two chunks there are
    assert sorted((r.model_extra or {})["ranks"]["rerank"] for r in reranked.data) == [1, 2]  # the model read both
    cut = results.data[0].score  # RRF scores: the second hit's is lower
    kept = client.vector_stores.search(store.id, query="Which planet is the largest?",
                                       ranking_options={"score_threshold": cut})  # fmt: skip
    assert [r.file_id for r in kept.data] == [top.file_id]

    retrieved = client.vector_stores.retrieve(store.id)
    assert retrieved.file_counts.completed == 2 and retrieved.file_counts.failed == 1
    assert retrieved.file_counts.total == 3
    failed = client.vector_stores.files.list(vector_store_id=store.id, filter="failed")
    assert [f.id for f in failed] == [broken.id]
    assert {f.id for f in client.vector_stores.files.list(vector_store_id=store.id, limit=1)} == {
        bread.id, planets.id, broken.id,
    }  # fmt: skip
    assert client.vector_stores.files.delete(file_id=planets.id, vector_store_id=store.id).deleted
    after = client.vector_stores.search(store.id, query="Which planet is the largest?")
    assert {r.file_id for r in after.data} == {bread.id}
    assert store.id in {s.id for s in client.vector_stores.list(limit=1)}
    assert client.vector_stores.delete(store.id).deleted
    with pytest.raises(Exception, match="404"):
        client.vector_stores.retrieve(store.id)
