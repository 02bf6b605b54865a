"""Dense indexes over unit vectors: exact search, and HNSW written from scratch.

Both answer `search(query, k) -> (labels, scores)` with cosine similarity (the vectors are unit length, so it
is a dot product), and both take `add(labels, vectors)` and `remove(labels)` as documents change.

`ExactIndex` is one matrix-vector product and a top-k: 100k chunks of 384 floats is ~38M multiply-adds, a
few milliseconds, which is why it is the default below ~10^5 vectors and the reference HNSW is measured against.

`HNSWIndex` follows Malkov & Yashunin, "Efficient and robust approximate nearest neighbor search using
Hierarchical Navigable Small World graphs" (2016; TPAMI 2018); the algorithm numbers are the paper's:
- Every node gets a random top layer l = floor(-ln(U) * mL), mL = 1/ln(M), so each layer holds ~1/M of the one
  below: a skip list made of proximity graphs.
- INSERT (Alg. 1): greedy descent (ef = 1) from the entry point through the layers above l, then on each layer
  from l down to 0 a beam search (SEARCH-LAYER, Alg. 2) with ef_construction candidates, from which M
  neighbours are chosen by the heuristic (Alg. 4): a candidate is kept only if it is closer to the new node than
  to every neighbour already kept, which spreads the links over directions and keeps clustered data connected.
  Links are made in both directions; a node whose list overflows (M, or M0 = 2M on layer 0) is pruned by the
  same heuristic.
- K-NN-SEARCH (Alg. 5): greedy descent to layer 0, a beam search with ef >= k there, the best k returned.
- Deletion marks a tombstone: the node still routes searches but is never returned (hnswlib's
  `mark_deleted`); `ExactIndex`-like rebuilds are the caller's choice once many nodes are dead.
- State is plain numpy arrays (`save`/`load` as one .npz), and the graph grows in place: ingesting more
  documents inserts their vectors into the loaded index, it is never rebuilt from scratch.
The graph walks (SEARCH-LAYER, the heuristic, INSERT) are compiled by numba (`@njit`): the same loops in Python
cost ~30 ms per insert, which would make a 100k index a matter of an hour; compiled, a fraction of a
millisecond. Layers are dense arrays (`links0` (N, M0); `links_up` (N, L, M), -1 = no link), so the compiled
code needs no Python objects.
"""

from __future__ import annotations

import heapq
import json
import math
from pathlib import Path

import numpy as np
import torch
from numba import njit


class ExactIndex:
    """Every stored vector scored against the query: exact, and fast enough for ~10^5 vectors."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.labels = np.zeros(0, dtype=np.int64)
        self.vectors = torch.zeros(0, dim)

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        self.labels = np.concatenate([self.labels, np.asarray(labels, dtype=np.int64)])
        self.vectors = torch.cat([self.vectors, torch.as_tensor(np.asarray(vectors, dtype=np.float32))])

    def remove(self, labels: np.ndarray) -> None:
        keep = ~np.isin(self.labels, np.asarray(labels, dtype=np.int64))
        self.labels, self.vectors = self.labels[keep], self.vectors[torch.from_numpy(keep)]

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best labels and their cosine similarities, best first."""
        if not len(self.labels):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        scores = self.vectors @ torch.as_tensor(np.asarray(query, dtype=np.float32))  # (N,)
        top = torch.topk(scores, min(k, len(self.labels)))
        return self.labels[top.indices.numpy()], top.values.numpy()


MAX_LEVEL = 8  # layers above 0 kept; P(level > 8) = M^-8, about 2e-10 for M = 16


@njit(cache=True, fastmath=True)
def _dot(vectors: np.ndarray, a: int, q: np.ndarray) -> float:
    s = 0.0  # float64: one type for the heaps' keys
    for j in range(q.shape[0]):
        s += vectors[a, j] * q[j]
    return s


@njit(cache=True)
def _link(links0: np.ndarray, links_up: np.ndarray, node: int, level: int, j: int) -> int:
    return links0[node, j] if level == 0 else links_up[node, level - 1, j]


@njit(cache=True)
def _search_layer(q, entries, ef, level, vectors, links0, links_up, visited, stamp):  # type: ignore[no-untyped-def]
    """Algorithm 2: the ef nodes most similar to q reachable from `entries` on one layer, most similar first."""
    candidates = [(0.0, np.int64(0))]  # max-heap by similarity (negated)
    found = [(0.0, np.int64(0))]  # min-heap: the worst of the best ef on top
    candidates.pop()
    found.pop()
    for e in entries:
        if visited[e] == stamp:
            continue
        visited[e] = stamp
        s = _dot(vectors, e, q)
        heapq.heappush(candidates, (-s, np.int64(e)))
        heapq.heappush(found, (s, np.int64(e)))
        if len(found) > ef:
            heapq.heappop(found)
    width = links0.shape[1] if level == 0 else links_up.shape[2]
    while len(candidates) > 0:
        neg, c = heapq.heappop(candidates)
        if -neg < found[0][0] and len(found) >= ef:
            break  # the best unexpanded candidate is worse than everything kept
        for j in range(width):
            nb = np.int64(_link(links0, links_up, c, level, j))
            if nb < 0:
                break
            if visited[nb] == stamp:
                continue
            visited[nb] = stamp
            s = _dot(vectors, nb, q)
            if len(found) < ef or s > found[0][0]:
                heapq.heappush(candidates, (-s, nb))
                heapq.heappush(found, (s, nb))
                if len(found) > ef:
                    heapq.heappop(found)
    n = len(found)
    sims, nodes = np.empty(n, np.float32), np.empty(n, np.int64)
    for i in range(n - 1, -1, -1):
        s, e = heapq.heappop(found)
        sims[i], nodes[i] = s, e
    return sims, nodes


@njit(cache=True)
def _greedy(q, node, top, bottom, vectors, links0, links_up):  # type: ignore[no-untyped-def]
    """Descend layers top..bottom+1 with ef = 1: the node nearest q on each is the next layer's entry."""
    best = _dot(vectors, node, q)
    for level in range(top, bottom, -1):
        changed = True
        while changed:
            changed = False
            for j in range(links_up.shape[2]):
                nb = links_up[node, level - 1, j]
                if nb < 0:
                    break
                s = _dot(vectors, nb, q)
                if s > best:
                    best, node, changed = s, nb, True
    return node


@njit(cache=True, fastmath=True)
def _select(sims, nodes, m, vectors):  # type: ignore[no-untyped-def]
    """Algorithm 4 on candidates sorted most similar first: keep one only if it is more similar to the base than
    to every one kept so far; fill up with the best of the rest (keepPrunedConnections)."""
    n = len(nodes)
    if n <= m:
        return nodes.copy()
    kept = np.empty(m, np.int64)
    pruned = np.empty(n, np.int64)
    n_kept = n_pruned = 0
    for i in range(n):
        ok = True
        for t in range(n_kept):
            if _dot(vectors, kept[t], vectors[nodes[i]]) >= sims[i]:
                ok = False
                break
        if ok:
            kept[n_kept] = nodes[i]
            n_kept += 1
            if n_kept == m:
                break
        else:
            pruned[n_pruned] = nodes[i]
            n_pruned += 1
    i = 0
    while n_kept < m and i < n_pruned:
        kept[n_kept] = pruned[i]
        n_kept += 1
        i += 1
    return kept[:n_kept]


@njit(cache=True)
def _set_links(links0, links_up, node, level, nbrs):  # type: ignore[no-untyped-def]
    row = links0[node] if level == 0 else links_up[node, level - 1]
    row[:] = -1
    row[: len(nbrs)] = nbrs


@njit(cache=True)
def _insert(node, level, entry, max_level, ef, M, vectors, links0, links_up, visited, stamp):  # type: ignore[no-untyped-def]
    """Algorithm 1 for one node whose vector is stored already; returns the next visit stamp."""
    q = vectors[node].copy()
    entry = _greedy(q, entry, max_level, level, vectors, links0, links_up)
    entries = np.array([entry], np.int64)
    for lc in range(min(level, max_level), -1, -1):
        stamp += 1
        sims, found = _search_layer(q, entries, ef, lc, vectors, links0, links_up, visited, stamp)
        m_max = links0.shape[1] if lc == 0 else links_up.shape[2]
        nbrs = _select(sims, found, M, vectors)
        _set_links(links0, links_up, node, lc, nbrs)
        for e in nbrs:  # the reverse links; a full list is pruned by the same heuristic
            count = 0
            while count < m_max and _link(links0, links_up, e, lc, count) >= 0:
                count += 1
            if count < m_max:
                if lc == 0:
                    links0[e, count] = node
                else:
                    links_up[e, lc - 1, count] = node
                continue
            both = np.empty(m_max + 1, np.int64)
            for j in range(m_max):
                both[j] = _link(links0, links_up, e, lc, j)
            both[m_max] = node
            both_sims = np.empty(m_max + 1, np.float32)
            for j in range(m_max + 1):
                both_sims[j] = _dot(vectors, both[j], vectors[e])
            order = np.argsort(-both_sims)
            _set_links(links0, links_up, e, lc, _select(both_sims[order], both[order], m_max, vectors))
        entries = found
    return stamp


class HNSWIndex:
    """A hierarchical navigable small-world graph (see the module docstring)."""

    def __init__(self, dim: int, M: int = 16, ef_construction: int = 128, ef_search: int = 64, seed: int = 0) -> None:
        self.dim, self.M, self.M0 = dim, M, 2 * M
        self.ef_construction, self.ef_search = ef_construction, ef_search
        self.mL = 1.0 / math.log(M)
        self.rng = np.random.default_rng(seed)
        self.n = 0
        self.vectors = np.zeros((0, dim), dtype=np.float32)
        self.labels = np.zeros(0, dtype=np.int64)
        self.levels = np.zeros(0, dtype=np.int8)
        self.deleted = np.zeros(0, dtype=bool)
        self.links0 = np.full((0, self.M0), -1, dtype=np.int32)  # layer 0: (capacity, M0), -1 = no link
        self.links_up = np.full((0, MAX_LEVEL, M), -1, dtype=np.int32)  # layers 1..MAX_LEVEL
        self._visited = np.zeros(0, dtype=np.int64)  # visit stamps: no per-search reset
        self._stamp = 0
        self.entry = -1
        self.max_level = -1
        self.node_of: dict[int, int] = {}
        self._grow(16)

    def __len__(self) -> int:
        return len(self.node_of)

    def _grow(self, needed: int) -> None:
        cap = len(self.labels)
        if needed <= cap:
            return
        new = max(needed, 2 * cap)

        def grown(a: np.ndarray, fill: object = 0) -> np.ndarray:
            out = np.full((new, *a.shape[1:]), fill, dtype=a.dtype)
            out[:cap] = a
            return out

        self.vectors, self.labels, self.levels = grown(self.vectors), grown(self.labels), grown(self.levels)
        self.deleted, self._visited = grown(self.deleted), grown(self._visited)
        self.links0, self.links_up = grown(self.links0, -1), grown(self.links_up, -1)

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Insert vectors under integer labels (a label already present is replaced)."""
        labels = np.asarray(labels, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.remove(np.array([lab for lab in labels.tolist() if lab in self.node_of], dtype=np.int64))
        self._grow(self.n + len(labels))
        for label, vector in zip(labels.tolist(), vectors, strict=True):
            node = self.n
            level = min(int(-math.log(1.0 - self.rng.random()) * self.mL), MAX_LEVEL)
            self.vectors[node], self.labels[node], self.levels[node] = vector, label, level
            self.node_of[label] = node
            self.n += 1
            if self.entry < 0:
                self.entry, self.max_level = node, level
                continue
            self._stamp = _insert(
                node, level, self.entry, self.max_level, self.ef_construction, self.M, self.vectors, self.links0,
                self.links_up, self._visited, self._stamp,
            )  # fmt: skip
            if level > self.max_level:
                self.entry, self.max_level = node, level

    def remove(self, labels: np.ndarray) -> None:
        """Tombstone these labels: they keep routing searches but are never returned."""
        for label in np.asarray(labels, dtype=np.int64).tolist():
            node = self.node_of.pop(label, None)
            if node is not None:
                self.deleted[node] = True

    def search(self, query: np.ndarray, k: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Algorithm 5: the (approximately) k best labels and their cosine similarities, best first."""
        if not self.node_of:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        q = np.ascontiguousarray(query, dtype=np.float32)
        ef = max(ef or self.ef_search, k)
        entry = _greedy(q, self.entry, self.max_level, 0, self.vectors, self.links0, self.links_up)
        n_dead = self.n - len(self.node_of)
        self._stamp += 1
        sims, nodes = _search_layer(
            q, np.array([entry], np.int64), ef + min(n_dead, ef), 0, self.vectors, self.links0, self.links_up,
            self._visited, self._stamp,
        )  # fmt: skip  # room for tombstones among the best
        alive = ~self.deleted[nodes]
        return self.labels[nodes[alive][:k]], sims[alive][:k]

    def labels_alive(self) -> np.ndarray:
        return np.fromiter(self.node_of, dtype=np.int64, count=len(self.node_of))

    # ------------------------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the graph to one .npz file (written beside and renamed, so a crash never leaves half a file)."""
        path = Path(path)
        n = self.n
        upper = np.flatnonzero(self.levels[:n] > 0)  # only nodes above layer 0 have upper links
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f, vectors=self.vectors[:n], labels=self.labels[:n], levels=self.levels[:n], deleted=self.deleted[:n],
                links0=self.links0[:n], upper_nodes=upper, upper_links=self.links_up[upper],
                params=np.array([self.dim, self.M, self.ef_construction, self.ef_search, self.entry, self.max_level]),
                rng=np.frombuffer(json.dumps(self.rng.bit_generator.state).encode(), dtype=np.uint8),
            )  # fmt: skip
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> HNSWIndex:
        with np.load(path) as f:
            dim, M, efc, efs, entry, max_level = (int(x) for x in f["params"])
            index = cls(dim, M, efc, efs)
            n = len(f["labels"])
            index._grow(n)
            index.n, index.entry, index.max_level = n, entry, max_level
            index.vectors[:n], index.labels[:n], index.levels[:n] = f["vectors"], f["labels"], f["levels"]
            index.deleted[:n], index.links0[:n] = f["deleted"], f["links0"]
            index.links_up[f["upper_nodes"]] = f["upper_links"]
            index.rng.bit_generator.state = json.loads(bytes(f["rng"]).decode())  # levels continue as if never saved
        index.node_of = {label: node for node, label in enumerate(index.labels[:n].tolist()) if not index.deleted[node]}
        return index
