"""A parameter server's receiver threads: each turns one worker's messages into events for the
server's main loop.

One thread per worker blocks on that worker's messages (``receive.py`` checks every byte), so
a silent or lost worker is noticed by its own thread (the engine's timeout or the dropped
connection) without stalling the others. Events go onto the main loop's queue as ``(event,
worker, data)``: "push", "checkpoint", "done", "bad" (a rejected message) or "lost".
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .. import comm
from .protocol import Kind, Status
from .receive import Receiver

# The server's own logger: these threads speak for it, and its log is where users look.
log = logging.getLogger("gradsync.ps.server")


def feed(server, rx: Receiver, worker: int, put: Callable[[tuple], None],
         closed: threading.Event) -> None:
    """Receive ``worker``'s messages with ``rx`` and ``put`` them as events until DONE, a bad
    message or loss.

    A rejected message ends the thread: that worker's stream is no longer trusted.

    Args:
        server: the ParameterServer served (its step, versions, partitions, config, stats).
        closed: set once ``server.serve()`` has returned; a failure after that is the group
            torn down under us, not worth a log line.
    """
    skip = server.config.nonfinite == "skip"
    while True:
        try:
            # the versions only grow: a push valid against them stays valid.
            msg = rx.receive(lambda: max(server.versions, default=0))
        except comm.CommError as exc:
            put(("lost", worker, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - never leave the main loop waiting
            if not closed.is_set():  # (else: the group was torn down under us)
                log.exception("server %d: reading rank %d's messages failed", server.index,
                              worker)
            put(("lost", worker, f"its messages could not be read: {exc!r}"))
            return
        kind = msg.header.kind
        if msg.status == Status.OK and kind == Kind.DONE:
            put(("done", worker, None))
            return
        if msg.status == Status.OK and kind == Kind.CHECKPOINT:
            put(("checkpoint", worker, msg.header))
            continue
        if msg.status == Status.OK or (msg.status == Status.NON_FINITE and skip):
            server.stats.bytes_received += msg.nbytes  # as pushed: compressed or not
            put(("push", worker, msg))
            continue
        put(("bad", worker, msg))
        return
