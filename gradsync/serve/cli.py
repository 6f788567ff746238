"""`gradsync serve`: models over HTTP, the Open Inference Protocol (KServe v2).

    gradsync train --checkpoint-dir ck --checkpoint-every 50
    gradsync serve --checkpoint-dir ck --replicas 2 --port 8000
    gradsync serve --model cnn=cnn.pt2 --model lm=lm.pt2 --frontends 2
    gradsync serve --model mypkg.models:build_model --checkpoint-dir ck
    curl localhost:8000/v2/models/digits-mlp

What each --model names is in sources.py. Start-up: listen on the address (a port in use is
one line, exit 2), resolve the models (a bad --model or nothing committed: one line, exit 2),
fork the other fronts (frontends.py), start every model's replicas and wait until each is
READY, then print one line naming the models and the URL. SIGINT or SIGTERM (to the front or
to its whole process group: replicas ignore both): stop accepting, start no replacement
replica, answer the requests in flight (a body still arriving gets 503 at once), stop the
replicas, exit 0 (during start-up: stop what started, exit 130).

What one client may hold is bounded (limits.py): a request's head (431 past 64 KiB, 408 past
--client-timeout), its body (413 past the limit of --max-request-rows, counted as it
streams; 408 when silent for --client-timeout), and --max-connections (503 beyond).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import sys
from dataclasses import replace
from importlib.util import find_spec

from ..flags import add_dataclass_arguments, dataclass_from_args
from .config import ServeConfig
from .frontends import Fronts
from .model import ServeError, private_copy
from .sources import ModelSource, model_sources

log = logging.getLogger(__name__)

EXIT_USAGE = 2


def add_parser(subparsers) -> None:
    """Register ``serve``."""
    serve = subparsers.add_parser(
        "serve", help="serve models over the Open Inference Protocol",
        description="Serve models over HTTP (Open Inference Protocol / KServe v2), "
        "dynamically batched across replica processes: torch.export programs, a "
        "module:function filled from a checkpoint, or the newest committed checkpoint of "
        "a `gradsync train --checkpoint-dir`.")
    add_dataclass_arguments(serve, ServeConfig, exclude={"models"})
    serve.add_argument(
        "--model", dest="models", action="append", metavar="[NAME=]SOURCE",
        help="a model to serve (repeatable): FILE.pt2 (torch.export.save; trusted as code), "
        "or package.module:function[@CHECKPOINT_DIR] (called with no arguments; the newest "
        "committed checkpoint's \"model\" state is loaded into it, from --checkpoint-dir "
        "without @); NAME= names it (default: the file's stem, or the function's name)")


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
        sources = model_sources(config.models, config.checkpoint_dir, config.row_shape(),
                                config.input_dtype)
    except ServeError as exc:
        sock.close()
        _say(str(exc))
        return EXIT_USAGE
    # Until the server runs, SIGTERM interrupts like Ctrl-C: the replicas started so far are
    # stopped and the command says "interrupted" (exit 130).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    fronts = Fronts.fork(config.frontends)
    if fronts.index:  # a forked front: never return into the caller's stack
        try:
            code = _run(config, sources, sock, fronts)
        except BaseException:  # noqa: BLE001 - interrupted during start-up
            code = 130
        os._exit(code)
    try:
        return _run(config, sources, sock, fronts)
    finally:
        fronts.stop_others()
        fronts.wait_others()


def _run(config: ServeConfig, sources: list[ModelSource], sock: socket.socket,
         fronts: Fronts) -> int:
    """One front: private copies of the checkpoints, then the server until it stops."""
    try:
        with contextlib.ExitStack() as stack:
            kept = [_kept(stack, source) for source in sources]
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                return runner.run(_serve(config, kept, sock, fronts))
    except ServeError as exc:
        _say(str(exc))
        return 1
    finally:
        sock.close()


def _kept(stack: contextlib.ExitStack, source: ModelSource) -> ModelSource:
    """``source`` reading its step from a private copy (model.private_copy) while serving."""
    if source.kind == "program":
        return source
    kept = stack.enter_context(private_copy(source.checkpoint()))
    return replace(source, path=str(kept.directory), source=source.path)


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


async def _serve(config: ServeConfig, sources: list[ModelSource], sock: socket.socket,
                 fronts: Fronts) -> int:
    import uvicorn

    from .app import create_app
    from .batcher import Batcher
    from .limits import BodyLimit, bounded_protocol
    from .metrics import ServeMetrics
    from .replicas import ReplicaPool

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # Before uvicorn waits for the requests in flight: no replacement replica from
            # now on, and uploads still arriving are answered 503 instead of awaited.
            for pool in pools:
                pool.stop_replacing()
            body_limit.stop()
            fronts.stop_others()
            await super().shutdown(sockets)

    metrics = ServeMetrics()
    pools = [ReplicaPool(s, config.replicas, config.threads, config.replica_timeout, metrics)
             for s in sources]
    batchers = [Batcher(pool, config.max_batch, config.max_delay_ms / 1000, metrics)
                for pool in pools]
    try:
        endpoints = await _start_endpoints(sources, pools, batchers, config.max_request_rows)
        body_limit = BodyLimit(create_app(endpoints, metrics),
                               max(e.spec.max_body_bytes() for e in endpoints.values()),
                               config.client_timeout)
        server = Server(uvicorn.Config(
            body_limit, http=bounded_protocol(config.client_timeout), log_level="warning",
            lifespan="off", limit_concurrency=config.max_connections,
            timeout_graceful_shutdown=max(30, int(config.replica_timeout) * 2)))
        # What start-up made (torch's modules: about a million objects) lives as long as the
        # process; frozen, the collector's full passes skip it instead of stalling every
        # request in flight for ~100 ms about once a second under load.
        gc.freeze()
        await fronts.started()
        if fronts.index == 0:
            print(_started_line(config, sources, sock), flush=True)
        # uvicorn re-raises a SIGINT/SIGTERM it caught once it has shut down; a handler that
        # does nothing turns that into the exit 0 of a clean shutdown.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _ignore)
        await server.serve(sockets=[sock])
    finally:
        for batcher in batchers:
            await batcher.close()
        for pool in pools:
            await pool.close()
    return 0


async def _start_endpoints(sources: list[ModelSource], pools: list, batchers: list,
                           max_rows: int) -> dict:
    """Every model's replicas started (at once), then its batcher: name -> app.Endpoint.

    Raises:
        ServeError: a model's replica could not start (the first such error).
    """
    from .app import Endpoint
    from .protocol import ModelSpec

    started = await asyncio.gather(*(pool.start() for pool in pools), return_exceptions=True)
    for error in started:
        if isinstance(error, BaseException):
            raise error
    endpoints = {}
    for source, pool, batcher in zip(sources, pools, batchers):
        spec = ModelSpec.from_ready(source.name, source.version, pool.ready, max_rows)
        endpoints[source.name] = Endpoint(spec, pool, batcher)
        batcher.start()
    return endpoints


def _started_line(config: ServeConfig, sources: list[ModelSource], sock: socket.socket
                  ) -> str:
    """"gradsync serve: MODEL step N[, MODEL version V ...] on URL (K replicas[...])"."""
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    models = ", ".join(f"{s.name} {'step' if s.kind != 'program' else 'version'} {s.version}"
                       for s in sources)
    fronts = f", {config.frontends} fronts" if config.frontends > 1 else ""
    each = " each" if len(sources) > 1 else ""
    return (f"gradsync serve: {models} on http://{url_host}:{port} "
            f"({config.replicas} replicas{each}{fronts})")
