"""One replica: a process that holds the model and answers JOB frames on its socket.

    python -m gradsync.serve.replica --fd FD --checkpoint-dir D --step S [--threads T]

The front process starts it with one end of a socketpair as ``FD``. It loads checkpoint ``S``,
says READY (numbers per row, logits per row, and the row's shape as u32s), then answers each
JOB with a RESULT (or an ERROR, and lives on) until the socket closes, when it exits 0. It
ignores SIGINT and SIGTERM: Ctrl-C, `timeout`, systemd and container runtimes signal the
whole process group, and the front, which finishes the requests in flight first, decides when
replicas stop (by closing their sockets).

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
import struct
import sys
from pathlib import Path

from . import wire


CRASH_ON_ENV = "GRADSYNC_SERVE_TEST_CRASH_ON"
CRASH_STATUS = 70


def serve_jobs(sock: socket.socket, model, input_shape: tuple[int, ...], dtype) -> None:
    """Answer JOB frames until the peer closes ``sock``."""
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
            x = torch.from_numpy(frame.array().copy()).reshape(frame.rows, *input_shape)
            with torch.inference_mode():
                logits = model(x.to(dtype)).float()  # (rows, classes)
            reply = wire.encode_array(wire.RESULT, frame.job, logits.numpy())
        except Exception as exc:  # noqa: BLE001 - the front answers the request with it
            reply = wire.encode(wire.ERROR, frame.job, 0, 0,
                                f"{type(exc).__name__}: {exc}".encode()[:4096])
        sock.sendall(reply)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="gradsync.serve.replica")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    import torch

    from .model import Checkpoint, ServeError, load_model

    torch.set_num_threads(args.threads)
    try:
        model, input_shape, classes = load_model(
            Checkpoint(Path(args.checkpoint_dir), args.step, ""))
    except ServeError as exc:
        sock.sendall(wire.encode(wire.ERROR, 0, 0, 0, str(exc).encode()))
        return 1
    dtype = next(model.parameters()).dtype
    row_size = 1
    for d in input_shape:
        row_size *= d
    shape = struct.pack(f"<{len(input_shape)}I", *input_shape)
    gc.freeze()  # the model and torch's modules: no full collection walks them again
    sock.sendall(wire.encode(wire.READY, 0, row_size, classes, shape))
    try:
        serve_jobs(sock, model, input_shape, dtype)
    except (ConnectionError, wire.WireError):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
