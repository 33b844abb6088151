"""Running the app under uvicorn, with two additions uvicorn does not have.

- **A deadline for a request's head.** uvicorn closes an idle kept-alive connection after
  `timeout_keep_alive`, but a connection that sends half a request line or half its headers stays
  open for ever (h11 only bounds their size); hundreds of them hold sockets and memory. The h11
  protocol below closes a connection whose request head has not arrived `header_timeout_s` after
  it opened or after its previous response. (A body that stops half way is the app's:
  `ServerConfig.body_timeout_s`, answered with 408.)
- **Open streams end cleanly on SIGTERM/SIGINT.** uvicorn's graceful shutdown waits for responses to
  finish, then cancels them mid-stream. The server here first tells the app
  (`app.state.begin_shutdown`), which ends every request: each open stream gets an error event and
  `[DONE]`, a waiting request a 503; then uvicorn closes the idle connections and exits.
"""

from __future__ import annotations

from typing import Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

GRACEFUL_SHUTDOWN_S = 5  # then uvicorn cancels what is left (a chat template still rendering)


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol; a connection whose request head is late is closed."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._head_of = None  # the request cycle whose head arrived last
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _saw_head(self) -> None:
        if self.cycle is not None and self.cycle is not self._head_of:  # a new request's head is in
            self._head_of = self.cycle
            self._disarm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._saw_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this kept-alive connection
            self._saw_head()  # unless it was pipelined and is already in

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server, which tells the app when a signal asks it to stop."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self.on_exit()  # thread- and signal-safe: it only schedules the app's shutdown on its loop
        super().handle_exit(sig, frame)


def make_server(app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "info") -> Server:
    """A server for an app of `create_app` (its ServerConfig gives the head deadline)."""
    protocol = type("HeadTimeoutH11", (HeadTimeoutH11,), {"header_timeout_s": app.state.config.header_timeout_s})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return Server(config, on_exit=app.state.begin_shutdown)
