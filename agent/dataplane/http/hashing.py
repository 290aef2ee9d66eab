"""Consistent hashing (a DestinationRule's ``loadBalancer.consistentHash``): ring hash and Maglev.

How this works: a key (a header's value, a cookie, the calling pod's address, a query
parameter) is hashed to 64 bits and looked up in a structure built once per endpoint set:
:class:`HashRing` (a ring hash as Envoy's: each endpoint owns points on a ring in
proportion to its weight, ``minimumRingSize``/8 per unit, so a leaving endpoint takes only
its own points with it; the key goes to the next point clockwise) or :class:`Maglev`
(Google's Maglev: a prime-sized table filled from each endpoint's own permutation of the
slots, so entries are near-equal and stable). When an
endpoint leaves, only the keys it held move (ring) or about 1/N of them (Maglev). A key's
endpoint that is excluded (a retry) or gone makes the lookup walk on to the next one.
Pure; no I/O; hashes are stable across processes (BLAKE2b), so every node's proxy sends a key
to the same endpoint.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

from agent.control.snapshot import Endpoint


def hash64(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big"
    )


def _name(e: Endpoint) -> str:
    return f"{e.address}:{e.port}"


class HashRing:
    def __init__(self, endpoints: Sequence[Endpoint], min_size: int = 1024) -> None:
        self.endpoints = tuple(endpoints)
        # points per unit of weight, independent of how many endpoints there are: when one
        # leaves, the others keep exactly their points, so only its keys move (the ring is at
        # least minimumRingSize from 8 units of weight on)
        per_weight = max(1, -(-min_size // 8))
        points: list[tuple[int, int]] = []
        for i, e in enumerate(self.endpoints):
            replicas = per_weight * max(e.weight, 1)
            name = _name(e)
            points += [(hash64(f"{name}_{r}"), i) for r in range(replicas)]
        points.sort()
        self._hashes = [h for h, _ in points]
        self._owners = [i for _, i in points]

    def pick(self, key: int, exclude: frozenset[tuple[str, int]] = frozenset()) -> Endpoint | None:
        n = len(self._hashes)
        if not n:
            return None
        start = bisect.bisect_left(self._hashes, key) % n
        for step in range(n):
            e = self.endpoints[self._owners[(start + step) % n]]
            if (e.address, e.port) not in exclude:
                return e
        return None


class Maglev:
    def __init__(self, endpoints: Sequence[Endpoint], table_size: int = 65537) -> None:
        self.endpoints = tuple(endpoints)
        m = table_size
        n = len(self.endpoints)
        table = [-1] * m
        if n:
            offsets = [hash64(f"{_name(e)}/offset") % m for e in self.endpoints]
            skips = [hash64(f"{_name(e)}/skip") % (m - 1) + 1 for e in self.endpoints]
            weights = [max(e.weight, 1) for e in self.endpoints]
            top = max(weights)
            nexts = [0] * n
            credit = [0.0] * n
            filled = 0
            while filled < m:  # weighted: an endpoint takes a turn once its credit reaches the top
                for i in range(n):
                    credit[i] += weights[i] / top
                    if credit[i] < 1.0:
                        continue
                    credit[i] -= 1.0
                    while True:
                        slot = (offsets[i] + nexts[i] * skips[i]) % m
                        nexts[i] += 1
                        if table[slot] < 0:
                            table[slot] = i
                            filled += 1
                            break
                    if filled == m:
                        break
        self._table = table

    def pick(self, key: int, exclude: frozenset[tuple[str, int]] = frozenset()) -> Endpoint | None:
        m = len(self._table)
        if not self.endpoints:
            return None
        start = key % m
        for step in range(m):
            e = self.endpoints[self._table[(start + step) % m]]
            if (e.address, e.port) not in exclude:
                return e
        return None


class Hashers:
    """The ring or table of each (cluster, endpoint set), built once (bounded cache)."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._built: dict[tuple[str, tuple[Endpoint, ...], str, int], HashRing | Maglev] = {}

    def pick(
        self,
        cluster: str,
        endpoints: Sequence[Endpoint],
        algorithm: str,
        size: int,
        key: str,
        exclude: frozenset[tuple[str, int]] = frozenset(),
    ) -> Endpoint | None:
        eps = tuple(sorted(endpoints, key=_name))
        k = (cluster, eps, algorithm, size)
        h = self._built.get(k)
        if h is None:
            if len(self._built) >= self.limit:
                self._built.clear()
            h = self._built[k] = Maglev(eps, size) if algorithm == "maglev" else HashRing(eps, size)
        return h.pick(hash64(key), exclude)
