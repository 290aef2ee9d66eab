"""Reading an agent's /metrics from inside the testbed, as Prometheus on the node would."""

from __future__ import annotations

import subprocess

from netns import testbed
from netns.topology import Topology


def node_metrics(topo: Topology, node: str) -> str:
    n = topo.node(node)
    assert n is not None
    r = testbed.popen_in(
        n.netns, None, ["curl", "-sS", f"http://{n.fabric_address}:15020/metrics"], stdout=subprocess.PIPE
    )
    return r.communicate(timeout=10)[0].decode()


def requests_total(text: str, **labels: str) -> float:
    """The sum of istio_requests_total over the series that carry ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("istio_requests_total{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
