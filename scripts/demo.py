"""The demo: a testbed of two nodes, pods talking across them, then a clean teardown.

Run through scripts/demo.sh (which runs setup first). Everything it creates is
named with the prefix ``demo`` and removed at the end, also on Ctrl-C or error.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from netns import testbed, topology

PREFIX = "demo"

SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080)); s.listen(8); print("ready", flush=True)
    for _ in range(int(sys.argv[1])):
        c, peer = s.accept()
        name = c.recv(1024).decode()
        c.sendall(f"hello {name} ({peer[0]}), this is {sys.argv[2]}".encode()); c.close()
    """
)
CLIENT = textwrap.dedent(
    """
    import socket, sys
    c = socket.create_connection((sys.argv[1], 8080), timeout=5)
    c.sendall(sys.argv[2].encode()); print(c.recv(1024).decode())
    """
)


def say(msg: str) -> None:
    print(f"\n\033[1m== {msg}\033[0m", flush=True)


def main() -> int:
    testbed.down(PREFIX)  # leftovers of an interrupted demo
    topo = topology.plan(topology.default_spec(PREFIX, nodes=2, pods_per_node=2))
    say("nodemesh testbed up --nodes 2 --pods-per-node 2 --prefix demo")
    testbed.up(topo)
    try:
        subprocess.run(
            [sys.executable, "-m", "agent.cli.main", "testbed", "status", "-p", PREFIX], check=True
        )
        server_pod = topo.pod("n2-p1")
        assert server_pod is not None
        say(f"a server in pod n2-p1 ({server_pod.address}) on node n2")
        server = testbed.popen_in_pod(
            server_pod, [sys.executable, "-c", SERVER, "2", server_pod.name], stdout=subprocess.PIPE
        )
        assert server.stdout is not None
        server.stdout.readline()
        for client in ("n1-p1", "n2-p2"):
            pod = topo.pod(client)
            assert pod is not None
            where = "across nodes" if pod.node != server_pod.node else "on the same node"
            say(f"pod {client} on {pod.node} -> n2-p1 ({where})")
            out = testbed.popen_in_pod(
                pod, [sys.executable, "-c", CLIENT, server_pod.address, client], stdout=subprocess.PIPE
            ).communicate(timeout=10)[0]
            print(out.decode().strip())
        server.wait(timeout=10)
    finally:
        say("nodemesh testbed down --prefix demo")
        rep = testbed.down(PREFIX)
        print(f"removed {len(rep.netns_removed)} network namespaces and the testbed's cgroups")
    return 0


if __name__ == "__main__":
    sys.exit(main())
