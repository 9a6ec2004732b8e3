"""The connection limits uvicorn does not enforce, as a subclass of its h11 protocol.

    config = uvicorn.Config(app, http=guarded_protocol(head_timeout_s=10, max_connections=64))
    AcceptErrorLog(interval_s=10).install(asyncio.get_running_loop())

uvicorn closes an idle keep-alive connection (timeout_keep_alive), but any byte restarts that
wait, and nothing limits the time to send a request's line and headers: a client that connects
and sends nothing, or a byte now and then, holds its connection and a file descriptor for ever,
and a few hundred of them take every descriptor. This module adds, per connection:
- a head deadline: a request's line and headers must be complete within `head_timeout_s` of the
  connection opening or of the previous answer; otherwise the connection is closed (answered
  408 JSON first if part of a head had come);
- a bound: at most `max_connections` connections are open; one more evicts the connection that
  has waited longest for a request head (it costs nothing to drop), or, when every connection
  is busy with a request, is answered 503 JSON and closed;
- JSON instead of uvicorn's plain-text answer to a request it cannot parse (400);
and for the listening socket, one log line per interval when accept() fails for want of file
descriptors, where asyncio logs a traceback for each of the up to `backlog` attempts per wake-up.
"""

import errno
import json
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["guarded_protocol", "AcceptErrorLog"]

_log = logging.getLogger("vim_rpi.serve")

_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _json_answer(status, reason, message, headers=()):
    """A whole HTTP/1.1 answer that closes the connection, written below the application."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def guarded_protocol(*, head_timeout_s: float, max_connections: int):
    """uvicorn's h11 protocol class with the head deadline and the connection bound."""

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None  # set while the connection waits for a request head
        _waiting_since = 0.0
        _cycle_before = None  # the request cycle before the awaited head; a new one means it came
        _head_started = False

        def connection_made(self, transport):
            super().connection_made(transport)  # joins self.connections
            closing = sum(1 for c in self.connections if c.transport.is_closing())
            if len(self.connections) - closing > max_connections and not self._evict_one():
                # retry-after: uploads.RETRY_AFTER_BUSY_S (a module of this layer: not imported)
                transport.write(_json_answer(503, "Service Unavailable", f"the server has {max_connections} "
                                            f"connections open, all busy; retry shortly", ["retry-after: 1"]))
                transport.close()
                return
            self._await_head()

        def _evict_one(self):
            idle = [c for c in self.connections if c is not self and c._head_timer is not None]
            if not idle:
                return False
            victim = min(idle, key=lambda c: c._waiting_since)
            victim._stop_head_timer()  # no longer a candidate while its close completes
            victim.transport.close()
            return True

        def _await_head(self):
            self._stop_head_timer()
            self._waiting_since, self._cycle_before, self._head_started = time.monotonic(), self.cycle, False
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _stop_head_timer(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def data_received(self, data):
            if self._head_timer is not None:
                self._head_started = True
            super().data_received(data)

        def handle_events(self):
            super().handle_events()
            if self._head_timer is not None and self.cycle is not self._cycle_before:
                self._stop_head_timer()  # the head is complete: the request is the application's now

        def on_response_complete(self):
            if not self.transport.is_closing():
                self._await_head()  # before super(): it may parse a pipelined head, which stops the timer
            super().on_response_complete()

        def _head_timed_out(self):
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self._head_started and self.conn.their_state is h11.IDLE:
                self.transport.write(_json_answer(408, "Request Timeout", f"the request's line and headers took "
                                                 f"longer than {head_timeout_s:g} s"))
            self.transport.close()

        def connection_lost(self, exc):
            self._stop_head_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg):
            self.transport.write(_json_answer(400, "Bad Request", "malformed HTTP request: the request line or "
                                             "headers could not be parsed"))
            self.transport.close()

    return GuardedH11Protocol


class AcceptErrorLog:
    """An event-loop exception handler: a failed accept() for want of file descriptors (or
    memory) becomes one warning line per `interval_s`, with the count of the ones not shown;
    anything else goes to the handler that was there before."""

    def __init__(self, interval_s=10.0):
        self.interval_s = interval_s
        self._last, self._unshown, self._previous = None, 0, None

    def install(self, loop):
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)

    def __call__(self, loop, context):
        error = context.get("exception")
        if "socket" in context and isinstance(error, OSError) and error.errno in _OUT_OF_RESOURCES:
            now = time.monotonic()
            if self._last is None or now - self._last >= self.interval_s:
                _log.warning("cannot accept connections: %s (%d more times in the last %g s); raise the open-file "
                             "limit (ulimit -n, LimitNOFILE=) or lower --max-connections", error.strerror,
                             self._unshown, self.interval_s)
                self._last, self._unshown = now, 0
            else:
                self._unshown += 1
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)
