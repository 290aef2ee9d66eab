"""The service graph: workloads and services as nodes, traffic as edges, laid out in layers.

How this works: :func:`service_graph` groups the windows twice, source
workload -> destination service and service -> destination workload (the
hop the proxy chose), so each edge carries its own golden signals.
:func:`layout` places nodes in columns: a DFS drops the edges that close a
cycle, each node goes one column right of its furthest caller (longest
path), and a node's row follows the mean row of its callers (one barycentre
sweep, names break ties), which keeps edges short and the picture the same
from one refresh to the next. The browser only draws what this returns.
Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from agent.dashboard.model import EdgeKey, Window, stats

COLUMN_PX = 480
ROW_PX = 48
MARGIN_PX = 20
NODE_W_PX = 190


def _wid(workload: str) -> str:
    return f"w:{workload}"


def _sid(service: str) -> str:
    return f"s:{service}"


def layout(nodes: Sequence[str], edges: Iterable[tuple[str, str]]) -> dict[str, tuple[int, int]]:
    """node -> (column, row)."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        if a in succ and b in succ and a != b:
            succ[a].append(b)
    for n in succ:
        succ[n].sort()
    # DFS (iterative) in name order; an edge to a node still on the stack closes a cycle
    state: dict[str, int] = {}  # 1 on stack, 2 done
    forward: dict[str, list[str]] = {n: [] for n in succ}
    for root in sorted(succ):
        if root in state:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        state[root] = 1
        while stack:
            n, i = stack[-1]
            if i < len(succ[n]):
                stack[-1] = (n, i + 1)
                m = succ[n][i]
                if state.get(m) == 1:
                    continue  # back edge
                forward[n].append(m)
                if m not in state:
                    state[m] = 1
                    stack.append((m, 0))
            else:
                state[n] = 2
                stack.pop()
    # longest path on the acyclic rest, in topological order
    indeg = {n: 0 for n in forward}
    for n in forward:
        for m in forward[n]:
            indeg[m] += 1
    ready = sorted(n for n, d in indeg.items() if d == 0)
    column = dict.fromkeys(forward, 0)
    preds: dict[str, list[str]] = {n: [] for n in forward}
    order: list[str] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in forward[n]:
            column[m] = max(column[m], column[n] + 1)
            preds[m].append(n)
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    columns: dict[int, list[str]] = {}
    for n in order:
        columns.setdefault(column[n], []).append(n)
    pos: dict[str, tuple[int, int]] = {}
    for c in sorted(columns):
        def key(n: str) -> tuple[float, str]:
            rows = [pos[p][1] for p in preds[n] if p in pos]
            return (sum(rows) / len(rows) if rows else -1.0, n)

        for row, n in enumerate(sorted(columns[c], key=key)):
            pos[n] = (c, row)
    return pos


def _label(id_: str) -> tuple[str, str]:
    kind, _, name = id_.partition(":")
    if kind == "s":
        return "service", name
    return "workload", name


def service_graph(windows: Sequence[Window]) -> dict[str, Any]:
    def to_service(k: EdgeKey) -> tuple[str, str]:
        return (_wid(k.source), _sid(k.service))

    def to_workload(k: EdgeKey) -> tuple[str, str] | None:
        return None if k.destination == "unknown" else (_sid(k.service), _wid(k.destination))

    hops = {**stats(windows, to_service), **stats(windows, to_workload)}
    ids = sorted({n for pair in hops for n in pair})
    pos = layout(ids, hops)
    nodes = []
    for id_ in ids:
        col, row = pos[id_]
        kind, name = _label(id_)
        nodes.append({
            "id": id_,
            "kind": kind,
            "name": name,
            "x": MARGIN_PX + col * COLUMN_PX,
            "y": MARGIN_PX + row * ROW_PX,
        })
    edges = []
    for (a, b), st in sorted(hops.items()):
        edges.append({"source": a, "target": b, "tcp_only": st.protocols == ("tcp",), **st.to_doc()})
    width = MARGIN_PX * 2 + NODE_W_PX + COLUMN_PX * max((c for c, _ in pos.values()), default=0)
    height = MARGIN_PX * 2 + ROW_PX * (1 + max((r for _, r in pos.values()), default=0))
    return {"nodes": nodes, "edges": edges, "width": width, "height": height, "node_width": NODE_W_PX}
