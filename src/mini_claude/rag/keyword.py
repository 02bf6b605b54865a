"""Keyword search: BM25 over the database's own full-text index, with a cost bounded by the query's rare words.

Design choices:
- The index is the database's, kept in step by it as rows change (`db.models.KEYWORD_INDEX_DDL`): SQLite FTS5
  with its BM25 (heading words count double), PostgreSQL full text with `ts_rank_cd` over the GIN index.
- A question becomes an OR of its words without stop words (all of its words if it has nothing else): BM25
  rewards chunks that hold more, and rarer, of them, where an AND would find nothing for most questions.
- An OR of common words matches most of a large corpus, and both databases score every match before the LIMIT
  (FTS5 has no top-k pruning: 65% of a 100k-chunk collection for a typical question, 200-350 ms). So the words
  are split by how many chunks hold them (counted, but never past `cap`): the *selective* ones (in at most
  `MAX_DF` of the chunks) find the candidates, ranked by the database's own top-k, and only those candidates
  are rescored with every word; when the rare words find too few, the next rarest joins them. This is
  MaxScore's idea (Turtle & Flood 1995), without its guarantee: a chunk holding none of the rare words is not
  seen, and it could outrank the candidates only through several common words of small IDF.
- SQLite rescoring is FTS5's own `bm25()` formula (fts5_aux.c: k1 1.2, b 0.75, IDF floored at 1e-6, column
  weights on term frequency), computed here from FTS5's statistics (row count and token totals of the
  `averages` record, each row's `docsize`) and term frequencies read from a per-connection temporary FTS5
  table with the same tokenizer, so a candidate's score is the one the whole query gives it (tested). A common
  word's exact count walks its whole posting list, so it is kept while the index changes by under 1%.
- PostgreSQL: the candidates come from the GIN index with the selective words, ranked by `ts_rank_cd`, and the
  best of them are ranked again with every word.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

# Words too common to help a keyword match (a short English list; `MAX_DF` handles the corpus' own).
_STOP = "a an and are as at be by can do does for from how i if in into is it its of on or so that the their then there"
STOP_WORDS = frozenset((_STOP + " these this to was what when where which who why will with you your").split(" "))
MAX_QUERY_WORDS = 32
MAX_DF = 0.05  # a word in more of the chunks than this only rescores candidates (see the module docstring)
MIN_DF_CAP = 1000  # ... but a word in at most this many chunks always finds candidates (small collections)
RESCORE_CANDIDATES = 100  # candidates rescored with every word (at least 2k)
HEADING_WEIGHT, TEXT_WEIGHT = 2.0, 1.0  # FTS5 bm25() column weights
BM25_K1, BM25_B = 1.2, 0.75  # FTS5's constants


def query_words(query: str) -> list[str]:
    """The query's distinct words, lower-cased, without stop words (all of them if it has nothing else)."""
    words = re.findall(r"\w+", query.lower())
    kept = [w for w in words if w not in STOP_WORDS] or words
    return list(dict.fromkeys(kept))[:MAX_QUERY_WORDS]


def search(session: Session, collection_id: str, query: str, k: int) -> list[tuple[int, float]]:
    """The k chunks that best match the query's words, as (chunk id, score), best first (higher is better)."""
    words = query_words(query)
    if not words:
        return []
    if session.get_bind().dialect.name == "sqlite":
        return _fts5_search(session, collection_id, words, k)
    return _tsvector_search(session, collection_id, words, k)


def by_rarity(words: list[str], df: dict[str, int], cap: int) -> tuple[list[str], int]:
    """The words found, rarest first, and how many of them find the candidates: those in at most `cap` chunks,
    or the rarest one when every word is more common."""
    found = sorted((w for w in words if df[w] > 0), key=lambda w: df[w])
    return found, max(sum(1 for w in found if df[w] <= cap), min(len(found), 1))


def candidates(
    found: list[str], n_chosen: int, k: int, top: Callable[[list[str], int], list[Any]]
) -> tuple[list[Any], list[str], list[str]]:
    """The candidate rows that `top(words, depth)` ranks for the `n_chosen` rarest of `found`, with the words
    that chose them and the rest; when those find too few, the next rarest word joins them (both databases)."""
    while True:
        chosen, rest = found[:n_chosen], found[n_chosen:]
        depth = max(RESCORE_CANDIDATES, 2 * k) if rest else k
        rows = top(chosen, depth)
        if len(rows) >= depth or not rest:
            return rows, chosen, rest
        n_chosen += 1


# ------------------------------------------------------------------------------------------------- SQLite FTS5

_FTS5_COUNT = text("SELECT count(*) FROM (SELECT 1 FROM rag_chunks_fts WHERE rag_chunks_fts MATCH :phrase LIMIT :cap)")
# FTS5's own top-k (`ORDER BY rank LIMIT`) first: no chunk row is read before ranking. The FTS table holds every
# collection, so the collection filter comes after, and the caller goes deeper when it left too few.
_FTS5_TOP = text(
    "SELECT c.id, f.score FROM (SELECT rowid AS id, rank AS score FROM rag_chunks_fts "
    f"WHERE rag_chunks_fts MATCH :match AND rank MATCH 'bm25({HEADING_WEIGHT}, {TEXT_WEIGHT})' "
    "ORDER BY rank LIMIT :deep) AS f JOIN rag_chunks c ON c.id = f.id WHERE c.collection_id = :cid "
    "ORDER BY f.score, c.id LIMIT :k"
)
_TOKENIZE = "content='', tokenize='porter unicode61'"  # contentless; the index's tokenizer (KEYWORD_INDEX_DDL)
_TEMP_TABLES = (  # per connection
    f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.rag_rescore USING fts5(heading, text, {_TOKENIZE})",
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.rag_rescore_terms USING fts5vocab(temp, rag_rescore, 'instance')",
    f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.rag_query USING fts5(word, {_TOKENIZE})",
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.rag_query_terms USING fts5vocab(temp, rag_query, 'instance')",
)


def _phrase(word: str) -> str:
    return f'"{word}"'  # a \w+ word holds no quote; FTS5 makes "os_path" the phrase "os path"


def _fts5_search(session: Session, collection_id: str, words: list[str], k: int) -> list[tuple[int, float]]:
    n_rows, n_tokens = _fts5_totals(session)
    cap = max(int(MAX_DF * n_rows), MIN_DF_CAP)
    df = {w: session.scalar(_FTS5_COUNT, {"phrase": _phrase(w), "cap": cap + 1}) or 0 for w in words}
    for w in words:  # a common word is counted exactly: its IDF rescores, and it orders the words by rarity
        if df[w] > cap:
            df[w] = _common_df(session, w, n_rows)
    found, n_chosen = by_rarity(words, df, cap)
    if not found:
        return []
    rows, chosen, rest = candidates(
        found, n_chosen, k, lambda chosen, depth: _fts5_top(session, collection_id, chosen, depth, n_rows)
    )
    if not rest:
        return [(int(i), -float(s)) for i, s in rows]  # FTS5's bm25() is lower-is-better
    scores = fts5_bm25(session, [int(i) for i, _ in rows], chosen + rest, df, n_rows, n_tokens)
    return sorted(scores.items(), key=lambda t: (-t[1], t[0]))[:k]


_COMMON_DF: dict[tuple[str, str], tuple[int, int]] = {}  # (database, word) -> (rows then, chunks with it)


def _common_df(session: Session, word: str, n_rows: int) -> int:
    """How many chunks hold a common word. Counting walks its whole posting list, so a count is kept while the
    index has grown or shrunk by under 1%: the IDF of a word in over `MAX_DF` of the chunks moves less."""
    key = (str(session.get_bind().url), word)
    cached = _COMMON_DF.get(key)
    if cached is not None and abs(cached[0] - n_rows) <= 0.01 * n_rows:
        return cached[1]
    count = session.scalar(text("SELECT count(*) FROM rag_chunks_fts WHERE rag_chunks_fts MATCH :p"),
                           {"p": _phrase(word)}) or 0  # fmt: skip
    if len(_COMMON_DF) >= 100_000:
        _COMMON_DF.clear()
    _COMMON_DF[key] = (n_rows, count)
    return count


def _fts5_top(session: Session, collection_id: str, words: list[str], k: int, n_rows: int) -> list[Any]:
    """FTS5's top k of the collection for an OR of `words`, going deeper while other collections crowd it out."""
    match, deep = " OR ".join(_phrase(w) for w in words), 4 * k
    while True:
        rows = session.execute(_FTS5_TOP, {"match": match, "deep": deep, "cid": collection_id, "k": k}).all()
        if len(rows) >= k or deep >= n_rows:
            return rows
        deep *= 8


def _varints(blob: bytes) -> list[int]:
    """SQLite's varints (big-endian groups of 7 bits, a 9th byte of 8), as FTS5 writes its statistics."""
    out, i = [], 0
    while i < len(blob):
        value = 0
        for j in range(9):
            byte = blob[i]
            i += 1
            if j == 8:
                value = (value << 8) | byte
                break
            value = (value << 7) | (byte & 0x7F)
            if byte < 0x80:
                break
        out.append(value)
    return out


def _fts5_totals(session: Session) -> tuple[int, int]:
    """(rows, tokens in all columns) of the FTS5 index: its `averages` record, which bm25() reads too."""
    blob = session.scalar(text("SELECT block FROM rag_chunks_fts_data WHERE id = 1"))
    if not blob:
        return 0, 0
    values = _varints(bytes(blob))
    return values[0], sum(values[1:])


def fts5_bm25(
    session: Session, ids: list[int], words: list[str], df: dict[str, int], n_rows: int, n_tokens: int
) -> dict[int, float]:
    """FTS5's bm25(HEADING_WEIGHT, TEXT_WEIGHT) of the query `words` (an OR of their phrases) for the chunks
    `ids`, negated (higher is better), from the index's statistics and each word's row count `df`."""
    if not ids:
        return {}
    for statement in _TEMP_TABLES:
        session.execute(text(statement))
    marks = ",".join(str(int(i)) for i in ids)
    session.execute(text(f"INSERT INTO temp.rag_rescore(rowid, heading, text) SELECT id, heading, text "
                         f"FROM rag_chunks WHERE id IN ({marks})"))  # fmt: skip
    sizes = {int(i): sum(_varints(bytes(sz))) for i, sz in
             session.execute(text(f"SELECT id, sz FROM rag_chunks_fts_docsize WHERE id IN ({marks})"))}  # fmt: skip
    # Each word's tokens as the index's tokenizer makes them ("returns" -> "return"; "os_path" -> "os", "path").
    session.execute(text("INSERT INTO temp.rag_query(rowid, word) VALUES (:r, :w)"),
                    [{"r": i, "w": w} for i, w in enumerate(words)])  # fmt: skip
    tokens: dict[int, list[str]] = defaultdict(list)
    for term, row in session.execute(text('SELECT term, doc FROM temp.rag_query_terms ORDER BY doc, "offset"')):
        tokens[row].append(term)
    terms = sorted({t for ts in tokens.values() for t in ts})
    positions: dict[tuple[str, int, int], set[int]] = defaultdict(set)  # (term, row, column) -> offsets
    in_terms = ",".join(f":t{j}" for j in range(len(terms)))
    instances = text(
        f"SELECT term, doc, CASE col WHEN 'heading' THEN 0 ELSE 1 END, \"offset\" "
        f"FROM temp.rag_rescore_terms WHERE term IN ({in_terms})"
    )
    for term, row, col, offset in session.execute(instances, {f"t{j}": t for j, t in enumerate(terms)}):
        positions[(term, row, col)].add(offset)
    for table in ("rag_rescore", "rag_query"):  # contentless tables: emptied without tokenizing again
        session.execute(text(f"INSERT INTO temp.{table}({table}) VALUES ('delete-all')"))
    by_term: dict[str, list[tuple[int, int, set[int]]]] = defaultdict(list)
    for (term, row, col), offsets in positions.items():
        by_term[term].append((row, col, offsets))
    avgdl = n_tokens / max(n_rows, 1)
    weights = (HEADING_WEIGHT, TEXT_WEIGHT)
    scores = dict.fromkeys(ids, 0.0)
    for i, w in enumerate(words):
        terms = tokens.get(i)
        if not terms or not df.get(w):
            continue
        idf = math.log((n_rows - df[w] + 0.5) / (df[w] + 0.5))
        idf = idf if idf > 0 else 1e-6
        freq: dict[int, float] = defaultdict(float)  # row -> column-weighted phrase frequency
        for row, col, starts in by_term[terms[0]]:
            follow = [positions.get((t, row, col), set()) for t in terms[1:]]
            hits = sum(all(o + j in p for j, p in enumerate(follow, 1)) for o in starts) if follow else len(starts)
            freq[row] += weights[col] * hits
        for row, f in freq.items():
            if f:
                norm = BM25_K1 * (1 - BM25_B + BM25_B * sizes.get(row, 0) / avgdl)
                scores[row] += idf * f * (BM25_K1 + 1) / (f + norm)
    return scores


# ----------------------------------------------------------------------------------------- PostgreSQL full text

_PG_COUNT = text(
    "SELECT count(*) FROM (SELECT 1 FROM rag_chunks WHERE collection_id = :cid AND "
    "to_tsvector('english', heading || ' ' || text) @@ plainto_tsquery('english', :word) LIMIT :cap) AS s"
)
# Candidates from the selective words through the GIN index, ranked; the best of them ranked by every word.
_PG_TOP = text(
    "WITH candidates AS (SELECT id, to_tsvector('english', heading || ' ' || text) AS tsv "
    "FROM rag_chunks, websearch_to_tsquery('english', :match) AS q "
    "WHERE collection_id = :cid AND to_tsvector('english', heading || ' ' || text) @@ q "
    "ORDER BY ts_rank_cd(to_tsvector('english', heading || ' ' || text), q) DESC, id LIMIT :depth) "
    "SELECT id, ts_rank_cd(tsv, websearch_to_tsquery('english', :words)) AS score FROM candidates "
    "ORDER BY score DESC, id LIMIT :k"
)


def _tsvector_search(session: Session, collection_id: str, words: list[str], k: int) -> list[tuple[int, float]]:
    n = session.scalar(text("SELECT count(*) FROM rag_chunks WHERE collection_id = :cid"), {"cid": collection_id})
    cap = max(int(MAX_DF * (n or 0)), MIN_DF_CAP)
    df = {w: session.scalar(_PG_COUNT, {"cid": collection_id, "word": w, "cap": cap + 1}) or 0 for w in words}
    found, n_chosen = by_rarity(words, df, cap)
    if not found:
        return []

    def top(chosen: list[str], depth: int) -> list[Any]:
        params = {"match": " or ".join(chosen), "words": " or ".join(found), "cid": collection_id}
        return session.execute(_PG_TOP, params | {"depth": depth, "k": depth}).all()

    rows, _, _ = candidates(found, n_chosen, k, top)
    return [(int(i), float(s)) for i, s in rows[:k]]
