"""The unit of splitting: connected components of units (a patient, else one image) tied by a
kept exact duplicate or a near-duplicate pair. Driver code on rows that grow with the duplicates,
never with the collection; both engines' results go through here.
"""

from __future__ import annotations


class UnionFind:
    """Union-find over unit names that appear in duplicate edges; a root is its component's
    smallest name, so groups do not depend on the order edges arrive in."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        parent = self.parent
        root = parent.setdefault(a, a)
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> dict[str, str]:
        """unit -> root for every unit that is not its own root."""
        return {u: r for u in list(self.parent) if (r := self.find(u)) != u}


def dedupe(dup_rows: list[dict]) -> tuple[frozenset, list[dict], list[tuple[str, str]], dict]:
    """From the shared-hash rows (`tables.exact_duplicate_rows`): (dropped keys, dropped rows,
    hash edges between kept units, counts)."""
    dropped = [{"key": r["key"], "reason": r["action"]} for r in dup_rows if r["action"] != "keep"]
    edges, first_unit, kinds = [], {}, {}
    for r in dup_rows:
        kinds[r["pixel_hash"]] = r["kind"]
        if r["action"] == "keep":
            first = first_unit.setdefault(r["pixel_hash"], r["unit"])
            if first != r["unit"]:
                edges.append((first, r["unit"]))
    counts = {"exact_duplicate_groups": len(kinds),
              "label_conflict_groups": sum(k == "conflict" for k in kinds.values())}
    return frozenset(d["key"] for d in dropped), sorted(dropped, key=lambda d: d["key"]), edges, counts


def components(hash_edges: list[tuple[str, str]], near: list[dict]) -> dict[str, str]:
    """unit -> group root, for units tied to another by a kept exact duplicate or a near pair."""
    uf = UnionFind()
    for a, b in hash_edges:
        uf.union(a, b)
    for p in near:
        if p["unit_a"] != p["unit_b"]:
            uf.union(p["unit_a"], p["unit_b"])
    return uf.roots()
