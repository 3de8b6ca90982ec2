"""Connection limits for the HTTP server: slow or idle clients cannot hold sockets forever.

uvicorn closes a connection that sits idle after a response (`timeout_keep_alive`), but nothing
closes one that never finishes its request head: a client that opens a socket and sends half a
request line (or half the headers of its next keep-alive request) holds a file descriptor for as
long as it likes. `header_timeout_protocol` adds that timer to uvicorn's HTTP protocol: from the
moment a connection opens (or a response completes) the client has `timeout_s` to deliver a
complete request head, else the connection is closed. Once the head is in, the timer is off:
request bodies (slow uploads) and long answers (enable_sync_mode waits minutes) are not limited
by it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this long (uvicorn's default)


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (h11 or httptools, as uvicorn picks) with a request-head
    timeout. Both set `self.cycle` to a new object when a request head is complete, which is
    what the guard watches; it touches nothing else of theirs."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    base: Any = AutoHTTPProtocol

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None
        _cycle_when_armed: object = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._disarm_if_head_complete()

        def on_response_complete(self) -> None:
            # Armed before uvicorn looks at pipelined data, which may start the next request.
            self._arm_head_timer()
            super().on_response_complete()
            self._disarm_if_head_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._disarm()
            if self.transport.is_closing():
                return
            self._cycle_when_armed = self.cycle
            self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _disarm_if_head_complete(self) -> None:
            if self._head_timer is not None and self.cycle is not self._cycle_when_armed:
                self._disarm()

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.cycle is self._cycle_when_armed and not self.transport.is_closing():
                client = "%s:%d" % self.client if self.client else "a client"  # noqa: UP031
                log.info("closing the connection of %s: no complete request within %gs", client, timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol
