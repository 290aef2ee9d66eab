"""The --etcd-ca/--etcd-cert/--etcd-key options, shared by every command that opens the
registry (the registry commands and `nodemesh ca serve`).

How this works: the options are not passed to the command function (``expose_value=False``);
their values wait in the click context, and :func:`open_registry` reads them when the
command opens its backend. Commands keep one signature whatever the transport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from agent.control.backend import Backend

F = TypeVar("F", bound=Callable[..., Any])


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    ctx.meta[f"nodemesh.{param.name}"] = value or ""
    return value


def etcd_tls_options(fn: F) -> F:
    """--etcd-ca/--etcd-cert/--etcd-key, read by :func:`open_registry` (not passed to ``fn``)."""
    for name, env, what in reversed((  # decorators apply bottom-up: keep ca, cert, key in --help
        ("--etcd-ca", "NODEMESH_ETCD_CA", "CA that signed etcd's server certificate (https://)"),
        ("--etcd-cert", "NODEMESH_ETCD_CERT", "client certificate, for etcd with --client-cert-auth"),
        ("--etcd-key", "NODEMESH_ETCD_KEY", "the client certificate's key"),
    )):
        fn = click.option(name, envvar=env, default=None, expose_value=False, callback=_remember,
                          type=click.Path(dir_okay=False), help=f"{what} (env {env})")(fn)
    return fn


def open_registry(registry_dir: str, etcd_url: str | None) -> Backend:
    """The backend the command's options name (with the --etcd-* TLS files, if any)."""
    from agent.control.backends import open_backend
    from agent.control.etcd import EtcdTls

    m = click.get_current_context().meta
    tls = EtcdTls(m.get("nodemesh.etcd_ca", ""), m.get("nodemesh.etcd_cert", ""),
                  m.get("nodemesh.etcd_key", ""))
    return open_backend(registry_dir, etcd_url, tls if (tls.ca or tls.cert or tls.key) else None)
