"""The FastAPI application of `vitlab serve`: the JSON API, the page at `/`, one log line per request.

Every refusal is a JSON body `{"error": "..."}` with a 4xx status: 413 for uploads over `max_upload_mb` (by
Content-Length or by the bytes streamed) and images over `max_pixels`, 415 for bodies that are not an image in an
accepted format, 422 for empty bodies, undecodable images and bad parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from vitlab.allocator import release_freed_memory
from vitlab.serve.batching import Batcher, PixelWork
from vitlab.serve.model import MAX_PIXELS, Answer, ImageProblem, ServedModel, check_image, overlay_png

log = logging.getLogger("vitlab.serve")
CONFIG_ENV = "VITLAB_SERVE_CONFIG"  # the ServeConfig as JSON, for each worker process uvicorn starts


@dataclass(frozen=True)
class ServeConfig:
    """What `vitlab serve` was asked for."""

    checkpoint: str
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_wait_ms: float = 5.0
    workers: int = 1
    max_upload_mb: float = 20.0
    max_pixels: int = MAX_PIXELS
    device: str = "auto"
    precision: str = "auto"


class Ranked(BaseModel):
    index: int
    label: str
    probability: float


class Rollout(BaseModel):
    method: Literal["rollout"]
    grid: list[list[float]]
    overlay_png: str
    layers: list[list[list[float]]] | None = None


class Prediction(BaseModel):
    model: str
    top: list[Ranked]
    image: dict[str, Any]
    preprocessing: dict[str, Any]
    precision: str
    attention: Rollout | None = None


class Problem(BaseModel):
    error: str


UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}
REFUSALS: dict[int | str, dict[str, Any]] = {
    413: {"model": Problem, "description": "upload or image too large"},
    415: {"model": Problem, "description": "not an image in an accepted format"},
    422: {"model": Problem, "description": "empty body, undecodable image or bad parameter"}}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as its declared or streamed size passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ImageProblem(413, f"upload of {int(declared):,} bytes is over the limit of {limit:,} bytes "
                                "(--max-upload-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ImageProblem(413, f"upload is over the limit of {limit:,} bytes (--max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def uploaded_image(request: Request, limit: int) -> bytes:
    """The image bytes of a multipart upload (its first file part) or of a raw body."""
    body = await read_body(request, limit)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except HTTPException as error:  # Starlette's answer to a malformed multipart body
        raise ImageProblem(422, f"malformed multipart body: {error.detail}") from None
    try:
        files = [value for value in form.values() if isinstance(value, UploadFile)]
        if not files:
            raise ImageProblem(422, "the multipart body has no file part: send the image as the field `file`")
        return await files[0].read()
    finally:
        await form.close()


def create_app(config: ServeConfig, served: ServedModel | None = None) -> FastAPI:
    """The application for `config`; `served` skips loading the checkpoint again (tests, the CLI's check)."""
    served = served or ServedModel(config.checkpoint, config.model_name, config.device, config.precision)
    limit = int(config.max_upload_mb * 2 ** 20)

    def run_batch(jobs: list[tuple[torch.Tensor, bool, bool]]) -> list[Answer]:
        try:
            return served.run(torch.stack([image for image, _, _ in jobs]), [rollout for _, rollout, _ in jobs],
                              [layers for _, _, layers in jobs])
        finally:
            release_freed_memory()  # a server's memory stays flat whatever mix of batch sizes it has run

    batcher: Batcher[tuple[torch.Tensor, bool, bool], Answer] = Batcher(run_batch, config.max_batch,
                                                                   config.max_wait_ms / 1000)
    pixel_work = PixelWork(pixel_threads())

    def check_and_prepare(data: bytes) -> tuple[tuple[str, int, int], torch.Tensor]:
        return check_image(data, config.max_pixels), served.prepare(data)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pixel_work.start()
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            pixel_work.stop()

    app = FastAPI(title="vitlab serve", version="1", lifespan=lifespan,
                  description=f"Top-k classes and attention rollout of `{served.name}` for uploaded images.")
    app.state.served, app.state.batcher = served, batcher

    @app.exception_handler(ImageProblem)
    async def image_problem(_: Request, error: ImageProblem) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in issue['loc'])}: {issue['msg']}"
                             for issue in error.errors())
        return JSONResponse({"error": f"bad parameter: {problems}"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_problem(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def server_fault(_: Request, error: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse({"error": f"internal error ({type(error).__name__}): {error}"}, status_code=500)

    @app.middleware("http")
    async def log_request(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            client = request.client.host if request.client else "-"
            query = f"?{request.url.query}" if request.url.query else ""
            log.info("%s %s %s%s %d %.1f ms", client, request.method, request.url.path, query, status,
                     (time.perf_counter() - started) * 1000)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("vitlab.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/healthz", summary="Liveness, with how many batches of each size ran")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "batches": {str(size): count for size, count in sorted(batcher.sizes.items())}}

    @app.get("/v1/model", summary="The model card: architecture, parameters, classes, image size, precision")
    async def model_card() -> dict[str, Any]:
        return {**served.card, "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms,
                "max_upload_mb": config.max_upload_mb, "max_pixels": config.max_pixels}

    @app.post("/v1/predict", response_model=Prediction, responses=REFUSALS, openapi_extra=UPLOAD_BODY,
              summary="Top-k classes of one image (multipart field `file`, or the raw bytes as the body)")
    async def predict(request: Request, attention: Literal["none", "rollout"] = "none",
                      top_k: int = Query(5, ge=1, description="how many classes to return"),
                      layers: bool = Query(False, description="with attention=rollout, also the rollout through "
                                                              "the first l layers for l = 1..L")) -> Prediction:
        if attention == "rollout" and not served.has_rollout:
            raise ImageProblem(422, f"attention=rollout needs a ViT; {served.card['architecture']} has no "
                                    "class-token attention to roll out")
        data = await uploaded_image(request, limit)
        (image_format, width, height), inputs = await pixel_work.run(check_and_prepare, data)
        answer = await batcher.submit((inputs, attention == "rollout", layers))
        top = answer.probabilities.topk(min(top_k, len(served.classes)))
        rollout = None
        if answer.rollout is not None:
            overlay = await pixel_work.run(overlay_png, data, answer.rollout, served.size)
            rollout = Rollout(method="rollout", grid=answer.rollout.tolist(), overlay_png=overlay,
                              layers=None if answer.layers is None else answer.layers.tolist())
        return Prediction(
            model=served.name, precision=served.precision, preprocessing=served.preprocessing, attention=rollout,
            top=[Ranked(index=int(index), label=served.classes[int(index)], probability=float(probability))
                 for probability, index in zip(top.values, top.indices, strict=True)],
            image={"format": image_format, "width": width, "height": height, "bytes": len(data)})

    return app


def pixel_threads() -> int:
    """Threads for decoding uploads: the cores this process may use (at least 1, at most 8)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def log_requests() -> None:
    """One line per request on stderr, in the server process and in each worker process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def app_from_env() -> FastAPI:
    """Factory for uvicorn's worker processes (`--workers` > 1): the config comes from `VITLAB_SERVE_CONFIG`."""
    log_requests()
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))


def run_server(config: ServeConfig, served: ServedModel) -> None:
    """Serve until interrupted. `served` is the model the caller loaded (and so checked); with several workers
    each worker process loads its own copy instead."""
    import uvicorn

    log_requests()
    options: dict[str, Any] = {"host": config.host, "port": config.port, "access_log": False, "log_level": "info"}
    if config.workers > 1:
        os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
        uvicorn.run("vitlab.serve.app:app_from_env", factory=True, workers=config.workers, **options)
    else:
        uvicorn.run(create_app(config, served), **options)
