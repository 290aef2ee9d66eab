"""Protocol cores, sans I/O: bytes in, events out (DESIGN §2).

``h2/`` is the HTTP/2 core (frames, connection state, abuse limits), used by the
HBONE tunnel and by the etcd gRPC client alike; ``hbone.py`` is the CONNECT
request format of the tunnel. Nothing here imports the data path or does I/O.
"""
