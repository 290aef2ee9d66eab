"""Reading the Prometheus text format: the few families the dashboard needs, nothing else.

How this works: :func:`parse_lines` walks the lines (of a text, or streamed from
an agent by :func:`agent.dashboard.scrape.lines_of`) and keeps only samples
whose metric name is in ``wanted``: other families cost one ``startswith``;
lines it cannot read are skipped and counted, never raised (one agent with a
bad line must not blank the whole view). A series' label text is parsed once
and kept in the caller's cache (a histogram's buckets share it: ``le`` is cut
out), since an agent's text repeats the same series every read. Label values
are unescaped as the format says (``\\\\``, ``\\"``, ``\\n``).
:func:`from_prometheus_api` turns an instant-vector answer of Prometheus' HTTP
API into the same samples, grouped by the ``instance`` label, so both sources
feed one model. Sans-I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?', re.ASCII)
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float
    le: float | None = None  # a histogram bucket's upper bound (not among ``labels``)


@dataclass(frozen=True, slots=True)
class Parsed:
    samples: tuple[Sample, ...]
    skipped_lines: int  # lines of wanted families that could not be read


def _unescape(v: str) -> str:
    return re.sub(r"\\.", lambda m: _UNESCAPE.get(m.group(0), m.group(0)), v) if "\\" in v else v


def _value(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return None if math.isnan(v) else v


LabelCache = dict[str, Mapping[str, str]]
MAX_CACHED_LABEL_SETS = 50_000


def parse(text: str, wanted: Iterable[str], cache: LabelCache | None = None) -> Parsed:
    return parse_lines(text.splitlines(), wanted, cache)


def parse_lines(lines: Iterable[str], wanted: Iterable[str], cache: LabelCache | None = None) -> Parsed:
    """Samples of the families named in ``wanted`` (full sample names, e.g.
    ``istio_requests_total``, ``istio_request_duration_milliseconds_bucket``); a name
    ending in ``*`` keeps every sample with that prefix.

    ``cache`` (label text -> labels), kept by the caller from one read of an agent to the
    next, makes a series' labels parsed once: samples with the same label text share one
    read-only mapping (the buckets of a histogram too: their ``le`` goes to ``Sample.le``).
    An agent's series are bounded, and so is the cache (emptied past MAX_CACHED_LABEL_SETS).
    """
    wanted = tuple(wanted)
    exact = {w for w in wanted if not w.endswith("*")}
    starts = tuple(w[:-1] if w.endswith("*") else w for w in wanted)
    prefixes = tuple(w[:-1] for w in wanted if w.endswith("*"))
    if cache is None:
        cache = {}
    elif len(cache) > MAX_CACHED_LABEL_SETS:
        cache.clear()
    out: list[Sample] = []
    skipped = 0
    for line in lines:
        if not line.startswith(starts):  # (C speed: most lines are other families)
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace < 0 or (0 <= space < brace):
            name, rest = (line[:space], line[space:]) if space > 0 else (line, "")
            labels: Mapping[str, str] = _EMPTY
            le = None
        else:
            name, rest = line[:brace], line[brace:]
            end = rest.rfind("}")  # (a value and timestamp never hold one; _parse_labels checks the rest)
            if end < 0:
                skipped += 1
                continue
            body, rest = rest[1:end], rest[end + 1:]
            le = None
            if name.endswith("_bucket"):
                le, body = _split_le(body)
            got = cache.get(body)
            if got is None:
                parsed = _parse_labels(body)
                if parsed is None:
                    skipped += 1
                    continue
                got = cache[body] = MappingProxyType(parsed)
            labels = got
        if name not in exact and not name.startswith(prefixes or ("\0",)):
            continue
        parts = rest.split()
        v = _value(parts[0]) if parts else None
        if v is None:
            skipped += 1
            continue
        if le is not None:
            bound = _value(le)
            if bound is None:
                skipped += 1
                continue
            out.append(Sample(name, labels, v, bound))
        else:
            out.append(Sample(name, labels, v))
    return Parsed(tuple(out), skipped)


_EMPTY: Mapping[str, str] = MappingProxyType({})


def _split_le(body: str) -> tuple[str | None, str]:
    """A bucket's ``le`` apart from its other labels (wherever it stands: prometheus_client
    sorts labels by name), so every bucket of a series shares one label text."""
    i = body.find('le="')
    while i > 0 and body[i - 1] not in ", ":
        i = body.find('le="', i + 1)
    if i < 0:
        return None, body
    j = body.find('"', i + 4)
    if j < 0:
        return None, body
    head, tail = body[:i].rstrip(" ,"), body[j + 1:].lstrip(" ,")
    return body[i + 4:j], f"{head},{tail}" if head and tail else head or tail


def _parse_labels(body: str) -> dict[str, str] | None:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        lm = _LABEL.match(body, pos)
        if lm is None or lm.end() == pos:
            break
        labels[lm.group(1)] = _unescape(lm.group(2))
        pos = lm.end()
    return None if body[pos:].strip() else labels


def from_prometheus_api(doc: Any, instance_label: str = "instance") -> dict[str, tuple[float, list[Sample]]]:
    """An instant-vector answer (``{"status": "success", "data": {"resultType": "vector",
    "result": [{"metric": {...}, "value": [ts, "v"]}]}}``) as (latest sample time, samples)
    per instance. Raises ValueError for anything else."""
    if not isinstance(doc, dict) or doc.get("status") != "success":
        err = doc.get("error") if isinstance(doc, dict) else None
        raise ValueError(f"Prometheus answered an error: {err or str(doc)[:200]}")
    data = doc.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector":
        raise ValueError("expected an instant vector from Prometheus' /api/v1/query")
    out: dict[str, tuple[float, list[Sample]]] = {}
    for r in data.get("result", []):
        metric = r.get("metric") if isinstance(r, dict) else None
        value = r.get("value") if isinstance(r, dict) else None
        if not isinstance(metric, dict) or not isinstance(value, list) or len(value) != 2:
            continue
        v = _value(str(value[1]))
        if v is None:
            continue
        labels = {str(k): str(x) for k, x in metric.items()}
        name = labels.pop("__name__", "")
        try:
            at_s = float(value[0])
        except (TypeError, ValueError):
            continue
        key = labels.get(instance_label, "?")
        prev_at, samples = out.get(key, (0.0, []))
        samples.append(Sample(name, labels, v))
        out[key] = (max(prev_at, at_s), samples)
    return out
