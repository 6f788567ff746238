"""The HTTP routes: the Open Inference Protocol's REST endpoints and `/metrics`, on FastAPI.

    GET  /v2/health/live                 200 while the process runs
    GET  /v2/health/ready                200 while every model has a live replica, else 503
    GET  /v2                             the server's metadata
    GET  /v2/models                      the names of the models served
    POST /v2/repository/index            each model's name, version and state (as Triton)
    GET  /v2/models/{name}               a model's metadata: inputs, outputs, shapes
    GET  /v2/models/{name}/ready         200 while one of its replicas lives, else 503
    POST /v2/models/{name}/infer         tensors in, the model's outputs out
    GET  /metrics                        Prometheus text

(The ``/versions/{version}`` forms of the model routes are accepted too; the version is the
checkpoint's step, or 1 for a program.) Every error is ``{"error": "..."}`` with a 4xx or
5xx status; a bad request changes nothing for any other client. Bodies reach the routes
through limits.BodyLimit, which refuses one over the largest model's
``spec.max_body_bytes()`` as it streams (413).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from .batcher import Batcher
from .metrics import CONTENT_TYPE_LATEST, ServeMetrics
from .protocol import ModelSpec, ProtocolError, infer_response, parse_infer
from .replicas import ReplicaJobError, ReplicaLost, ReplicaPool


@dataclass
class Endpoint:
    """One served model: its metadata, replicas and batcher."""

    spec: ModelSpec
    pool: ReplicaPool
    batcher: Batcher


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _find(models: dict[str, Endpoint], name: str, version: str | None) -> Endpoint:
    """The endpoint of ``name`` at ``version``; raises the protocol's 404 for another."""
    endpoint = models.get(name)
    if endpoint is None:
        raise ProtocolError(404, f"unknown model {name!r}; this server serves "
                                 f"{', '.join(map(repr, models))}")
    spec = endpoint.spec
    if version not in (None, "", spec.version):
        raise ProtocolError(404, f"model {spec.name!r} has version {spec.version} only, "
                                 f"not {version!r}")
    return endpoint


def _for_model(models: dict[str, Endpoint], name: str, version: str | None,
               answer) -> Response:
    """``answer(endpoint)`` for a served model, the protocol's error for another."""
    try:
        endpoint = _find(models, name, version)
    except ProtocolError as exc:
        return _error(exc.status, str(exc))
    return answer(endpoint)


def _add_error_handlers(app: FastAPI) -> None:
    """FastAPI's own errors, and requests that fail its validation (400), as
    ``{"error": "..."}`` like every other error."""

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(str(e.get("msg", e)) for e in exc.errors()))


def _ready(pools: list[ReplicaPool]) -> Response:
    live = [pool.live for pool in pools]
    ready = all(live)
    return JSONResponse({"ready": ready, "replicas": sum(live)},
                        status_code=200 if ready else 503)


def _add_metadata_routes(app: FastAPI, models: dict[str, Endpoint]) -> None:
    """Health, readiness and metadata of the server and of each model."""

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def server_ready() -> Response:
        return _ready([e.pool for e in models.values()])

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "gradsync", "version": __version__, "extensions": []}

    @app.get("/v2/models")
    async def model_names() -> dict:
        return {"models": list(models)}

    @app.post("/v2/repository/index")
    async def repository_index() -> list:
        return [{"name": name, "version": e.spec.version,
                 "state": "READY" if e.pool.live else "UNAVAILABLE"}
                for name, e in models.items()]

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return _for_model(models, name, version, lambda e: JSONResponse(e.spec.metadata()))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        return _for_model(models, name, version, lambda e: _ready([e.pool]))


def _add_infer_route(app: FastAPI, models: dict[str, Endpoint], metrics: ServeMetrics) -> None:
    """The inference endpoint: the request checked and parsed, then batched; counted."""

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        start = time.perf_counter()
        response = await _infer(name, version, request)
        known = name in models
        metrics.requests.labels(name if known else "", str(response.status_code)).inc()
        if response.status_code == 200:
            metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response

    async def _infer(name: str, version: str | None, request: Request) -> Response:
        try:
            endpoint = _find(models, name, version)
            spec = endpoint.spec
            body = await request.body()  # at most the limit of limits.BodyLimit
            parsed = parse_infer(spec, body,
                                 request.headers.get("inference-header-content-length"))
        except ProtocolError as exc:
            return _error(exc.status, str(exc))
        try:
            outputs = await endpoint.batcher.infer(parsed.rows)
        except ReplicaLost as exc:
            return _error(503, f"no replica could compute the request: {exc}")
        except ReplicaJobError as exc:
            return _error(500, f"the model failed on the request: {exc}")
        metrics.rows.labels(name).inc(len(outputs))
        return JSONResponse(infer_response(spec, parsed, outputs))


def create_app(models: dict[str, Endpoint], metrics: ServeMetrics) -> FastAPI:
    """The FastAPI application serving ``models`` (by name), each through its batcher."""
    app = FastAPI(title="gradsync serve", version=__version__, docs_url=None,
                  redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_metadata_routes(app, models)
    _add_infer_route(app, models, metrics)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
