"""Retrieval over the user's own documents: readers, chunking, the store, dense indexes and hybrid search.

Uses the core (`encoder.py`) and the database (`db/`); knows nothing of HTTP (the server composes it).

- `readers.py`    files to text (txt, md, rst, html, pdf, docx, json, jsonl), with PDF page starts
- `chunking.py`   text to chunks counted in the embedder's word pieces, split at headings and paragraphs
- `index.py`      dense indexes: exact (one matrix product) and HNSW, written from scratch
- `store.py`      collections, documents and chunks in the project database, with its keyword index
- `retrieve.py`   keyword, dense and hybrid (reciprocal rank fusion) search
- `knowledge.py`  ingestion (idempotent by content hash) and search, composed: what the CLI and server call
- `grounding.py`  grounded answers: numbered sources fitted to the context, [n] marks read back as citations
"""
