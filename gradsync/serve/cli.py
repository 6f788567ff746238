"""`gradsync serve`: the newest committed checkpoint of a training run, over HTTP.

    gradsync train --checkpoint-dir ck --checkpoint-every 50
    gradsync serve --checkpoint-dir ck --replicas 2 --port 8000
    curl localhost:8000/v2/models/digits-mlp

Start-up: listen on the address (a port in use is one line, exit 2), pick the checkpoint
(nothing committed: one line, exit 2), start the replicas and wait until each is READY, then
print one line naming the model and the URL. SIGINT or SIGTERM (to the front or to its whole
process group: replicas ignore both): stop accepting, start no replacement replica, answer
the requests in flight (a body still arriving gets 503 at once), stop the replicas, exit 0
(during start-up: stop what started, exit 130).

What one client may hold is bounded (limits.py): a request's head (431 past 64 KiB, 408 past
--client-timeout), its body (413 past the limit of --max-request-rows, counted as it
streams; 408 when silent for --client-timeout), and --max-connections (503 beyond).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import signal
import socket
import sys
from importlib.util import find_spec

from ..flags import add_dataclass_arguments, dataclass_from_args
from .config import ServeConfig
from .model import ServeError, find_checkpoint, private_copy

log = logging.getLogger(__name__)

EXIT_USAGE = 2


def add_parser(subparsers) -> None:
    """Register ``serve``."""
    serve = subparsers.add_parser(
        "serve", help="serve a trained checkpoint over the Open Inference Protocol",
        description="Serve the newest committed checkpoint of --checkpoint-dir over HTTP "
        "(Open Inference Protocol / KServe v2), dynamically batched across replica processes.")
    add_dataclass_arguments(serve, ServeConfig)


def _say(line: str) -> None:
    print(f"gradsync: error: {line}", file=sys.stderr, flush=True)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, bound before anything slow starts.

    Raises:
        ServeError: the address is in use or cannot be bound (one line).
    """
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    # proto too (IPPROTO_TCP): asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP; without it a keep-alive client waits ~40 ms per answer (Nagle vs delayed ACK).
    sock = socket.socket(info[0], info[1], info[2])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
    try:
        sock.bind(info[4])
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ServeError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(False)
    return sock


def main(args: argparse.Namespace) -> int:
    """Run `gradsync serve`; returns the exit status."""
    try:
        config = dataclass_from_args(ServeConfig, args)
    except ValueError as exc:
        _say(str(exc))
        return EXIT_USAGE
    # httptools too: limits.bounded_protocol bounds requests' heads on its parser.
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "httptools")
               if find_spec(m) is None]
    if missing:
        _say(f"gradsync serve needs {', '.join(missing)}: pip install 'gradsync[serve]'")
        return EXIT_USAGE
    try:
        sock = listen(config.host, config.port)
    except ServeError as exc:
        _say(str(exc))
        return EXIT_USAGE
    try:
        checkpoint = find_checkpoint(config.checkpoint_dir)
    except ServeError as exc:
        sock.close()
        _say(str(exc))
        return EXIT_USAGE
    # Until the server runs, SIGTERM interrupts like Ctrl-C: the replicas started so far are
    # stopped and the command says "interrupted" (exit 130).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with private_copy(checkpoint) as kept, \
                asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_serve(config, kept, sock))
    except ServeError as exc:
        _say(str(exc))
        return 1
    finally:
        sock.close()


def _ignore(signum: int, frame: object) -> None:
    pass


def _loop_factory():
    """uvloop's event loop where it is installed (the serve extra): the front process's
    one loop parses every request, so its speed is the server's on small models."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(config: ServeConfig, checkpoint, sock: socket.socket) -> int:
    import uvicorn

    from .app import create_app
    from .batcher import Batcher
    from .limits import BodyLimit, bounded_protocol
    from .metrics import ServeMetrics
    from .protocol import ModelSpec
    from .replicas import ReplicaPool

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # Before uvicorn waits for the requests in flight: no replacement replica from
            # now on, and uploads still arriving are answered 503 instead of awaited.
            pool.stop_replacing()
            body_limit.stop()
            await super().shutdown(sockets)

    metrics = ServeMetrics()
    pool = ReplicaPool(checkpoint, config.replicas, config.threads, config.replica_timeout,
                       metrics)
    batcher = Batcher(pool, config.max_batch, config.max_delay_ms / 1000, metrics)
    try:
        await pool.start()
        assert pool.shape is not None
        spec = ModelSpec(checkpoint.workload, str(checkpoint.step), pool.shape.input_shape,
                         pool.shape.classes, config.max_request_rows)
        batcher.start()
        body_limit = BodyLimit(create_app(spec, pool, batcher, metrics), spec.max_body_bytes(),
                               config.client_timeout)
        server = Server(uvicorn.Config(
            body_limit, http=bounded_protocol(config.client_timeout), log_level="warning",
            lifespan="off", limit_concurrency=config.max_connections,
            timeout_graceful_shutdown=max(30, int(config.replica_timeout) * 2)))
        # What start-up made (torch's modules: about a million objects) lives as long as the
        # process; frozen, the collector's full passes skip it instead of stalling every
        # request in flight for ~100 ms about once a second under load.
        gc.freeze()
        host, port = sock.getsockname()[:2]
        url_host = f"[{host}]" if ":" in host else host
        print(f"gradsync serve: {spec.name} step {spec.version} on http://{url_host}:{port} "
              f"({config.replicas} replicas)", flush=True)
        # uvicorn re-raises a SIGINT/SIGTERM it caught once it has shut down; a handler that
        # does nothing turns that into the exit 0 of a clean shutdown.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _ignore)
        await server.serve(sockets=[sock])
    finally:
        await batcher.close()
        await pool.close()
    return 0
