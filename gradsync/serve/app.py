"""The HTTP routes: the Open Inference Protocol's REST endpoints and `/metrics`, on FastAPI.

    GET  /v2/health/live                 200 while the process runs
    GET  /v2/health/ready                200 while a replica lives, else 503
    GET  /v2                             the server's metadata
    GET  /v2/models/{name}               the model's metadata: inputs, outputs, shapes
    GET  /v2/models/{name}/ready         200 while a replica lives, else 503
    POST /v2/models/{name}/infer         JSON tensors in, logits and predicted class out
    GET  /metrics                        Prometheus text

(The ``/versions/{version}`` forms of the model routes are accepted too; the version is the
checkpoint's step.) Every error is ``{"error": "..."}`` with a 4xx or 5xx status; a bad
request changes nothing for any other client. Bodies reach the routes through
limits.BodyLimit, which refuses one over ``spec.max_body_bytes()`` as it streams (413).
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from .batcher import Batcher
from .metrics import CONTENT_TYPE_LATEST, ServeMetrics
from .protocol import ModelSpec, ProtocolError, infer_response, parse_infer
from .replicas import ReplicaJobError, ReplicaLost, ReplicaPool


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _check_model(spec: ModelSpec, name: str, version: str | None) -> None:
    """Raises the protocol's 404 unless ``name`` and ``version`` are this server's model."""
    if name != spec.name:
        raise ProtocolError(404, f"unknown model {name!r}; this server serves "
                                 f"{spec.name!r}")
    if version not in (None, "", spec.version):
        raise ProtocolError(404, f"model {spec.name!r} has version {spec.version} only, "
                                 f"not {version!r}")


def _for_model(spec: ModelSpec, name: str, version: str | None, answer) -> Response:
    """``answer()`` for this server's model, the protocol's error for another."""
    try:
        _check_model(spec, name, version)
    except ProtocolError as exc:
        return _error(exc.status, str(exc))
    return answer()


def _add_error_handlers(app: FastAPI) -> None:
    """FastAPI's own errors, and requests that fail its validation (400), as
    ``{"error": "..."}`` like every other error."""

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(str(e.get("msg", e)) for e in exc.errors()))


def _add_metadata_routes(app: FastAPI, spec: ModelSpec, pool: ReplicaPool) -> None:
    """Health, readiness and metadata of the server and of its model."""

    def ready() -> Response:
        live = pool.live
        return JSONResponse({"ready": live > 0, "replicas": live},
                            status_code=200 if live else 503)

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def server_ready() -> Response:
        return ready()

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "gradsync", "version": __version__, "extensions": []}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return _for_model(spec, name, version, lambda: JSONResponse(spec.metadata()))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        return _for_model(spec, name, version, ready)


def _add_infer_route(app: FastAPI, spec: ModelSpec, batcher: Batcher,
                     metrics: ServeMetrics) -> None:
    """The inference endpoint: the request checked and parsed, then batched; counted."""

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        start = time.perf_counter()
        response = await _infer(name, version, request)
        metrics.requests.labels(name if name == spec.name else "", str(response.status_code)
                                ).inc()
        if response.status_code == 200:
            metrics.latency.labels(spec.name).observe(time.perf_counter() - start)
        return response

    async def _infer(name: str, version: str | None, request: Request) -> Response:
        try:
            _check_model(spec, name, version)
            body = await request.body()  # at most spec.max_body_bytes() (limits.BodyLimit)
            parsed = parse_infer(spec, body,
                                 request.headers.get("inference-header-content-length"))
        except ProtocolError as exc:
            return _error(exc.status, str(exc))
        try:
            logits = await batcher.infer(parsed.rows)
        except ReplicaLost as exc:
            return _error(503, f"no replica could compute the request: {exc}")
        except ReplicaJobError as exc:
            return _error(500, f"the model failed on the request: {exc}")
        metrics.rows.labels(spec.name).inc(len(logits))
        return JSONResponse(infer_response(spec, parsed, logits))


def create_app(spec: ModelSpec, pool: ReplicaPool, batcher: Batcher,
               metrics: ServeMetrics) -> FastAPI:
    """The FastAPI application serving ``spec``'s model through ``batcher``."""
    app = FastAPI(title="gradsync serve", version=__version__, docs_url=None,
                  redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_metadata_routes(app, spec, pool)
    _add_infer_route(app, spec, batcher, metrics)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
