"""Who may use the HTTP server: the Host names of its address, cross-origin requests, the token.

    app.add_middleware(HostAndOrigin, names=host_names("127.0.0.1", []), origins=[])
    token_matches(request.headers.get("authorization"), "s3cret")   # -> bool

- Host. A page on another site can point its own DNS name at 127.0.0.1, or at this machine,
  and then talk to this server as if it were that site ("DNS rebinding"). A browser sends the
  name it resolved as Host, so a request whose Host is not one of this server's names is refused
  with 400: allowed are IP addresses (a page loaded from an address is this server's own),
  `localhost`, the name the server listens on, this machine's host name (and NAME.local) when
  it serves the network, and the names given (--allowed-hosts; `*`: any).
- Origin. A browser marks cross-site requests with Origin, and a "simple" POST needs no
  preflight, so a page elsewhere could make a visitor's browser use the API. A request whose
  Origin is not this server's own, nor one of the origins given (--allowed-origins), is refused
  with 403 before it reaches a route. Clients that are not browsers send no Origin.
- The token is compared as UTF-8 bytes, in constant time.
Every refusal is JSON {"error": "..."}. Only the server modules import the web framework.
"""

import hmac
import ipaddress
import socket
import urllib.parse
from typing import Iterable, Optional

from starlette.responses import JSONResponse

__all__ = ["HostAndOrigin", "host_names", "is_loopback", "token_matches"]


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_names(bind_host: str, allowed: Iterable[str]) -> Optional[frozenset]:
    """The Host names a server listening on `bind_host` answers to, besides IP addresses;
    None when `allowed` holds "*" (any name)."""
    allowed = list(allowed)
    if "*" in allowed:
        return None
    names = {"localhost", bind_host.strip("[]"), *allowed}
    if not is_loopback(bind_host):  # serving the network: the names it is reached by
        names |= {socket.gethostname(), socket.gethostname() + ".local"}
    return frozenset(name.lower().rstrip(".") for name in names)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _host_and_port(netloc: str):
    """("name", port or None) of a Host header or an origin's netloc, lowercase. Browsers leave
    the scheme's default port out of both; ValueError if malformed."""
    parts = urllib.parse.urlsplit("//" + netloc)
    if not parts.hostname or parts.username is not None or parts.path:
        raise ValueError(netloc)
    return parts.hostname.rstrip("."), parts.port


def token_matches(authorization: Optional[str], token: str) -> bool:
    """Whether an Authorization header is "Bearer <token>". The web framework decodes header
    bytes as Latin-1, so encoding back to Latin-1 gives the bytes sent; the token is compared
    as UTF-8, in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"),
                                                              token.encode("utf-8", "surrogateescape"))


class HostAndOrigin:
    """ASGI middleware: refuses a request whose Host is not one of `names` (None: any) with 400,
    and one whose Origin is neither the request's own nor in `origins` ("*": any) with 403."""

    def __init__(self, app, *, names: Optional[frozenset], origins: Iterable[str]):
        self.app, self.names = app, names
        self.origins = {origin.lower().rstrip("/") for origin in origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {name: value.decode("latin-1") for name, value in scope["headers"] if name in (b"host", b"origin")}
            refusal = self._refusal(headers.get(b"host"), headers.get(b"origin"))
            if refusal is not None:
                status, message = refusal
                return await JSONResponse({"error": message}, status_code=status)(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, host, origin):
        """(status, message) for a refused request, else None."""
        if host is not None:
            try:
                name, port = _host_and_port(host)
            except ValueError:
                return 400, f"malformed Host header {host!r}"
            if self.names is not None and not _is_ip(name) and name not in self.names:
                return 400, (f"Host {name!r} is not a name of this server (a DNS-rebinding page?); if it is, "
                             f"start the server with --allowed-hosts {name}")
        if origin is None or "*" in self.origins or origin.lower().rstrip("/") in self.origins:
            return None
        parts = urllib.parse.urlsplit(origin)
        try:
            same = host is not None and parts.scheme in ("http", "https") and _host_and_port(parts.netloc) == (name, port)
        except ValueError:
            same = False
        if not same:
            return 403, (f"cross-origin request from {origin!r} refused; to let pages of that origin use this "
                         f"server, start it with --allowed-origins {origin}")
        return None
