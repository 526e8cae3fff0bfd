"""TLS for TCP connections: each entry's ``sslmode``, and the root certificate it verifies against.

Cloud SQL's unix sockets are local to the container (the Cloud SQL connector encrypts what
leaves it), so socket entries need no TLS. Over TCP, a connection that quietly falls back to
plain text lets a man in the middle ask for the password in clear, IAM tokens included: TCP
entries require TLS unless the manifest says ``sslmode = "disable"``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

# job.db's Target and job.manifest's DatabaseEntry, which both import this module: duck-typed here.
Target = Any
DatabaseEntry = Any

MODES = ("disable", "require", "verify-ca", "verify-full")
# What asyncpg says when the server answers the TLS request with "no".
REFUSED = "rejected SSL upgrade"


def mode(target: Target) -> str:
    """Return the sslmode a target connects with: the entry's, the URL's, else by transport."""
    if target.entry.sslmode is not None:
        return target.entry.sslmode
    in_url = target.address.get("ssl")
    if isinstance(in_url, str):
        return in_url
    socket = target.address.get("host")
    if target.entry.instance or (isinstance(socket, str) and socket.startswith("/")):
        return "disable"
    return "require"


def connect_args(target: Target) -> dict[str, Any]:
    """Return asyncpg.connect's ``ssl`` argument for a target (a context when a root is given)."""
    chosen = mode(target)
    if chosen in ("verify-ca", "verify-full") and target.ssl_root:
        return {"ssl": _context(target.ssl_root, chosen == "verify-full")}
    return {"ssl": chosen}


@functools.lru_cache(maxsize=8)
def _context(root_pem: str, check_hostname: bool) -> ssl.SSLContext:
    """Return a client context that trusts only root_pem (and checks the host name for verify-full)."""
    import ssl

    context = ssl.create_default_context(cadata=root_pem)
    context.check_hostname = check_hostname
    return context


def check_entry(entry: DatabaseEntry) -> None:
    """Raise ValueError for TLS keys that cannot apply to the entry (manifest validation)."""
    if entry.instance and entry.sslmode not in (None, "disable"):
        raise ValueError(
            "sslmode applies to host (TCP) entries: a Cloud SQL socket needs no TLS, remove sslmode"
        )
    if entry.sslrootcert is not None and entry.sslmode not in ("verify-ca", "verify-full"):
        raise ValueError('sslrootcert needs sslmode = "verify-ca" or "verify-full"')


def refused(exc: BaseException | None, causes: list[BaseException]) -> bool:
    """Return whether a connection failed because TLS could not be had (retrying will not help)."""
    import ssl

    return any(REFUSED in str(c) or isinstance(c, ssl.SSLError) for c in causes)


def hint(target: Target) -> str:
    """Return what to do when a TCP entry could not get TLS."""
    return (
        f"the server at {target.entry.location} did not complete TLS (sslmode = {mode(target)!r}): "
        "enable TLS on the server, give sslrootcert (a secret reference to the CA certificate) for "
        'verify-ca or verify-full, or, only for a server on this machine, set sslmode = "disable"'
    )
