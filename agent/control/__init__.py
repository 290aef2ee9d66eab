"""Control plane: the registry model, its backends, snapshots, health checks, mesh DNS.

Start here: :mod:`model` (what is stored), :mod:`snapshot` (what the data path
reads), :mod:`registry` (keeps a snapshot current from a backend),
:mod:`apply` (validated, atomic writes), :mod:`health`, :mod:`dns`.
"""
