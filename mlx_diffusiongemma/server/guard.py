"""Who may talk to a server without an API key: the Host and Origin checks, and CORS.

Without `--api-key` anything that reaches the port is served, and a web page the user visits can
reach a loopback port: it can POST a "simple" cross-site request (no preflight) and, through DNS
rebinding (its own name resolving to 127.0.0.1), even read the replies. The checks follow
Ollama's choice (mlx-lm's and vLLM's servers allow every origin):

- **Host.** A server bound to a loopback address answers only requests whose `Host` names a
  loopback host (`localhost`, `*.localhost`, `127.x.x.x`, `[::1]`), so a rebound name is refused.
  Bound to another address (`--host 0.0.0.0`) it is meant to be reached by other names: no check.
- **Origin.** A request sent by a web page carries its `Origin`. Allowed: pages on loopback hosts
  (any port: the web chat at `/`, local tools), a page this server served at an IP address of its
  own (the web chat over the LAN: an IP address cannot be rebound), and the `--allowed-origins`
  list (`*`: every origin). Anything else is refused with 403 before the request is read.
- **CORS.** Allowed origins get CORS headers (Starlette's middleware answers their preflights), so
  a local web app can read replies, as Ollama allows.

With an API key none of the first two applies: a page cannot send the key it does not know.
Non-JSON bodies (the `text/plain` of a simple request) are refused by the routes (`app.read_body`).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

# Origins on loopback hosts, any port (what is_loopback accepts, as one regular expression for CORS).
LOOPBACK_ORIGINS = r"https?://(localhost|[a-z0-9.-]+\.localhost|127(\.\d{1,3}){3}|\[::1\])(:\d+)?"


def is_loopback(host: str | None) -> bool:
    """A host name or address that can only mean this machine."""
    if not host:
        return False
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(netloc: str) -> str | None:
    try:
        return urlsplit("//" + netloc).hostname
    except ValueError:
        return None


def _is_ip(host: str | None) -> bool:
    try:
        ipaddress.ip_address(host or "")
        return True
    except ValueError:
        return False


class HostOriginGuard:
    """ASGI middleware: refuse (403) a request whose Host or Origin is not allowed (see the module)."""

    def __init__(self, app, *, bind_host: str, allowed_origins: tuple[str, ...] = (), enabled: bool = True):
        self.app = app
        self.check_host = enabled and is_loopback(bind_host)
        self.check_origin = enabled and "*" not in allowed_origins
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                       if k in (b"host", b"origin")}
            problem = self.problem(headers.get("host", ""), headers.get("origin"))
            if problem is not None:
                message, code = problem
                body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
                await JSONResponse(body, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def problem(self, host: str, origin: str | None) -> tuple[str, str] | None:
        if self.check_host and host and not is_loopback(_hostname(host)):
            return (f"Host '{host[:100]}' is not this server's name: a server bound to loopback answers only "
                    "requests for localhost (a guard against DNS rebinding); bind another address with --host, "
                    "or set --api-key", "host_not_allowed")
        if self.check_origin and origin is not None and not self.origin_allowed(origin, host):
            return (f"requests from the web page at '{origin[:100]}' are not allowed (a guard against other "
                    "sites using this server); allow it with --allowed-origins, or set --api-key",
                    "origin_not_allowed")
        return None

    def origin_allowed(self, origin: str, host: str) -> bool:
        if origin.rstrip("/").lower() in self.allowed:
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https"):
            return False
        if is_loopback(parts.hostname):
            return True
        # A page this server served at one of its IP addresses (the web chat over the LAN).
        return _is_ip(parts.hostname) and parts.netloc.lower() == host.lower()


def middleware(*, bind_host: str, allowed_origins: tuple[str, ...], api_key_set: bool) -> list[Middleware]:
    """The guard (outermost: a refused request goes no further), then CORS for the allowed origins."""
    return [
        Middleware(HostOriginGuard, bind_host=bind_host, allowed_origins=allowed_origins, enabled=not api_key_set),
        Middleware(CORSMiddleware, allow_origins=[o for o in allowed_origins if o != "*"],
                   allow_origin_regex=".*" if "*" in allowed_origins else LOOPBACK_ORIGINS,
                   allow_methods=["GET", "POST"], allow_headers=["*"]),
    ]
