"""One replica: a process that holds one model and answers JOB frames on its socket.

    python -m gradsync.serve.replica --fd FD --source JSON [--threads T]

The front process starts it with one end of a socketpair as ``FD`` and the model's
sources.ModelSource as JSON. It loads the model, says READY (its input and output specs, as
JSON), then answers each JOB with a RESULT (or an ERROR, and lives on) until the socket
closes, when it exits 0. It ignores SIGINT and SIGTERM: Ctrl-C, `timeout`, systemd and
container runtimes signal the whole process group, and the front, which finishes the
requests in flight first, decides when replicas stop (by closing their sockets).

Test hook: with ``GRADSYNC_SERVE_TEST_CRASH_ON=X`` in its environment a replica exits at once
(status 70, as a model that segfaults would die) on a JOB whose first number is ``X``: the
tests' poison request. Unset, nothing changes.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import sys

from . import wire


CRASH_ON_ENV = "GRADSYNC_SERVE_TEST_CRASH_ON"
CRASH_STATUS = 70


def serve_jobs(sock: socket.socket, served) -> None:
    """Answer JOB frames with ``served`` (a model.Served) until the peer closes ``sock``."""
    import torch

    crash_on = float(os.environ[CRASH_ON_ENV]) if os.environ.get(CRASH_ON_ENV) else None
    while True:
        frame = wire.recv_frame(sock)
        if frame is None:
            return
        if frame.kind != wire.JOB:
            raise wire.WireError(f"replica got frame kind {frame.kind}, expected JOB")
        if crash_on is not None and frame.array()[0, 0] == crash_on:
            os._exit(CRASH_STATUS)
        try:
            x = torch.from_numpy(frame.array().copy()).reshape(frame.rows, *served.input.shape)
            with torch.inference_mode():
                y = served.forward(x)  # (rows, *output.shape)
            reply = wire.encode_array(wire.RESULT, frame.job,
                                      y.reshape(frame.rows, -1).numpy())
        except Exception as exc:  # noqa: BLE001 - the front answers the request with it
            reply = wire.encode(wire.ERROR, frame.job, 0, 0,
                                f"{type(exc).__name__}: {exc}".encode()[:4096])
        sock.sendall(reply)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="gradsync.serve.replica")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    import torch

    from .model import ServeError
    from .sources import ModelSource, load_source

    torch.set_num_threads(args.threads)
    try:
        served = load_source(ModelSource.from_json(args.source))
    except ServeError as exc:
        sock.sendall(wire.encode(wire.ERROR, 0, 0, 0, str(exc).encode()))
        return 1
    gc.freeze()  # the model and torch's modules: no full collection walks them again
    sock.sendall(wire.encode(wire.READY, 0, 0, 0, served.ready_json()))
    try:
        serve_jobs(sock, served)
    except (ConnectionError, wire.WireError):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
