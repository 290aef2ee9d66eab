"""Reading the Prometheus text format: the few families the dashboard needs, nothing else.

How this works: :func:`parse` walks the text line by line and keeps only
samples whose metric name is in ``wanted`` (comments, other families and
lines it cannot read are skipped and counted, never raised: one agent with a
bad line must not blank the whole view). Label values are unescaped as the
format says (``\\\\``, ``\\"``, ``\\n``). :func:`from_prometheus_api` turns an
instant-vector answer of Prometheus' HTTP API into the same samples, grouped
by the ``instance`` label, so both sources feed one model. Sans-I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?', re.ASCII)
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*", re.ASCII)
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


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


def parse(text: str, wanted: Iterable[str]) -> Parsed:
    """Samples of the families named in ``wanted`` (full sample names, e.g.
    ``istio_requests_total``, ``istio_request_duration_milliseconds_bucket``); a name
    ending in ``*`` keeps every sample with that prefix."""
    exact = {w for w in wanted if not w.endswith("*")}
    prefixes = tuple(w[:-1] for w in wanted if w.endswith("*"))
    out: list[Sample] = []
    skipped = 0
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _NAME.match(line)
        if m is None:
            continue
        name = m.group(0)
        if name not in exact and not name.startswith(prefixes or ("\0",)):
            continue
        rest = line[m.end():]
        labels: dict[str, str] = {}
        if rest.startswith("{"):
            end = _labels_end(rest)
            if end < 0:
                skipped += 1
                continue
            body, rest = rest[1:end], rest[end + 1:]
            pos = 0
            while pos < len(body):
                lm = _LABEL.match(body, pos)
                if lm is None or lm.end() == pos:
                    break
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
            if body[pos:].strip():
                skipped += 1
                continue
        parts = rest.split()
        v = _value(parts[0]) if parts else None
        if v is None:
            skipped += 1
            continue
        out.append(Sample(name, labels, v))
    return Parsed(tuple(out), skipped)


def _labels_end(rest: str) -> int:
    """Index of the ``}`` closing the label set (quotes and escapes respected), or -1."""
    quoted = False
    i = 1
    while i < len(rest):
        c = rest[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "}":
            return i
        i += 1
    return -1


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
