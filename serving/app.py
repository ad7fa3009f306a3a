"""The HTTP service (FastAPI): routes, the request guard (API key, body size, content type), access logs without
patient data, and the micro-batched model behind them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import secrets
import time
import uuid
from importlib import resources
from typing import Any, Optional

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from configs import ServeOptions
from serving.batching import MicroBatcher, QueueFull
from serving.model_service import API_SCHEMA_VERSION, Decoded, ImageRejected, ServedModel

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("serving.access")

UPLOAD_ROUTES = ("/v1/predict", "/v1/explain")
ACCEPTED_PART_TYPES = ("image/", "application/octet-stream")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# The page is self-contained: its script and style are inline, its pictures data: URLs; nothing else may load.
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'")


def _problem(status: int, message: str, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class RequestGuard:
    """ASGI middleware in front of every route: a request id, the API key on /v1/, size and content-type limits on
    uploads before their body is read, and one access-log line per request (no file names, no image content)."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given_id = headers.get("x-request-id", "")
        request_id = given_id if _REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex[:12]
        scope.setdefault("state", {})["request_id"] = request_id
        record: dict[str, Any] = {"status": 500, "bytes_in": 0}
        start = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
                record["started"] = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                record["bytes_in"] += len(message.get("body", b""))
                if record["bytes_in"] > self.max_body_bytes:
                    record["too_large"] = True
                    raise _BodyTooLarge
            return message

        async def send_unless_too_large(message):
            if not record.get("too_large"):  # the app's answer to a cut-off body is replaced by 413 below
                await send_with_id(message)

        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                try:
                    await self.app(scope, counting_receive, send_unless_too_large)
                except _BodyTooLarge:
                    pass
                if record.get("too_large") and not record.get("started"):
                    await self._too_large()(scope, receive, send_with_id)
        finally:
            state = scope.get("state", {})
            access_logger.info("%s %s %s %d bytes_in=%d images=%s ok=%s ms=%.1f", request_id, scope["method"],
                               scope["path"], record["status"], record["bytes_in"], state.get("images", "-"),
                               state.get("answered", "-"), (time.perf_counter() - start) * 1000)

    def _too_large(self) -> JSONResponse:
        return _problem(413, f"the request is larger than --max_upload_mb ({self.max_body_bytes / 1e6:g} MB); send "
                             f"fewer or smaller images per request")

    def _refusal(self, scope, headers: dict[str, str]) -> Optional[JSONResponse]:
        path = scope["path"]
        if self.api_key is not None and path.startswith("/v1/"):
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given.encode(), self.api_key.encode()):
                return _problem(401, "missing or wrong API key: send it in the X-API-Key header",
                                {"WWW-Authenticate": "X-API-Key"})
        if path in UPLOAD_ROUTES and scope["method"] == "POST":
            content_type = headers.get("content-type", "")
            if not content_type.lower().startswith("multipart/form-data"):
                return _problem(415, f"send the images as multipart/form-data (a 'files' field per image), not "
                                     f"{content_type or 'a body without Content-Type'}")
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body_bytes:
                return self._too_large()
        return None


class _BodyTooLarge(Exception):
    pass


def _page() -> str:
    return resources.files("serving").joinpath("static", "index.html").read_text(encoding="utf-8")


def create_app(model: ServedModel, options: ServeOptions, api_key: Optional[str] = None) -> FastAPI:
    batcher = MicroBatcher(model.predict, options.max_batch_size, options.max_wait_ms / 1000, options.queue_size)
    ready = {"value": False}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        ready["value"] = True
        logger.info("model ready: %s (%s backend), classes %s", model.run_dir, model.options.backend,
                    ", ".join(model.class_names))
        try:
            yield
        finally:
            # uvicorn closes the listening socket and lets requests in flight finish before it gets here
            ready["value"] = False
            await batcher.stop()
            batcher.executor.shutdown(wait=True)
            model.close()
            logger.info("stopped after %d images in %d batches (mean batch %.1f, largest %d, %d requests refused "
                        "with 503)", batcher.stats.images, batcher.stats.batches, batcher.stats.mean_batch,
                        batcher.stats.largest_batch, batcher.stats.refused)

    app = FastAPI(title="skinclf", version=str(API_SCHEMA_VERSION), lifespan=lifespan,
                  description="Skin-disease photo classification with the run's preprocessing, temperature, TTA, "
                              "operating points and abstention. Images go up as multipart/form-data, one 'files' "
                              "part each.",
                  docs_url=None, redoc_url=None)  # their pages load scripts from a CDN; /openapi.json stays
    app.state.batcher = batcher
    page = _page()

    async def answer(request: Request, files: list[UploadFile], explain: bool) -> JSONResponse:
        if len(files) > options.max_images_per_request:
            return _problem(413, f"{len(files)} images in one request; at most --max_images_per_request "
                                 f"({options.max_images_per_request}) are accepted")
        if not files:
            return _problem(400, "no image: send one or more 'files' parts")
        request.state.images = len(files)
        try:
            results = await asyncio.wait_for(_classify(files, explain), options.request_timeout_s)
        except QueueFull as full:
            return _problem(503, str(full), {"Retry-After": str(full.retry_after_s)})
        except asyncio.TimeoutError:
            return _problem(504, f"no answer within --request_timeout_s ({options.request_timeout_s:g} s)")
        request.state.answered = sum(1 for r in results if r["ok"])
        return JSONResponse({"schema_version": API_SCHEMA_VERSION, "model_name": model.info.model_name,
                             "run_id": model.run_dir.name, "request_id": request.state.request_id,
                             "results": results})

    async def _decode_all(files: list[UploadFile]) -> tuple[list[dict[str, Any]], list[tuple[int, Decoded]]]:
        results: list[dict[str, Any]] = []
        decoded: list[tuple[int, Decoded]] = []
        for index, upload in enumerate(files):
            entry: dict[str, Any] = {"index": index, "filename": upload.filename, "ok": False}
            results.append(entry)
            content_type = (upload.content_type or "application/octet-stream").lower()
            if not content_type.startswith(ACCEPTED_PART_TYPES):
                entry["error"] = f"content type {content_type} is not an image"
                continue
            try:
                decoded.append((index, await run_in_threadpool(model.decode, await upload.read())))
            except ImageRejected as err:
                entry["error"] = str(err)
        return results, decoded

    async def _classify(files: list[UploadFile], explain: bool) -> list[dict[str, Any]]:
        with batcher.expecting(len(files)):
            results, decoded = await _decode_all(files)
        if decoded:
            answers = await batcher.submit([d.tensor for _, d in decoded])
            loop = asyncio.get_running_loop()
            for (index, item), row in zip(decoded, answers):
                results[index].update(ok=True, **row)
                if explain:  # on the model thread, between batches: the model is never used by two threads
                    png = await loop.run_in_executor(batcher.executor, model.explain, item, row["predicted_class"],
                                                     row["confidence"])
                    results[index]["overlay_png_base64"] = base64.b64encode(png).decode("ascii")
        return results

    @app.post("/v1/predict", summary="Classify one or more photos")
    async def predict(request: Request, files: list[UploadFile] = File(..., description="one part per image")):
        """Per image: predicted class and probability, every class's probability (top-k with --topk), flag_<class>
        for each operating point, and decision (the class, or 'uncertain' below the abstention threshold). A file that
        is not a usable photo gets ok=false and its reason; the others are still answered."""
        return await answer(request, files, explain=False)

    @app.post("/v1/explain", summary="Classify and explain with Grad-CAM")
    async def explain(request: Request, files: list[UploadFile] = File(..., description="one part per image")):
        """As /v1/predict, plus overlay_png_base64: the Grad-CAM of the predicted class over the photo (PNG)."""
        if not model.explains:
            return _problem(501, "this service has no PyTorch model for Grad-CAM: start serve.py with a run folder "
                                 "as --model_path and --explain True")
        return await answer(request, files, explain=True)

    @app.get("/v1/model", summary="Classes, preprocessing, thresholds and source run")
    async def describe():
        return {**model.describe(), "limits": {"max_images_per_request": options.max_images_per_request,
                                               "max_upload_mb": options.max_upload_mb}}

    @app.get("/healthz", summary="The process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and the batcher runs")
    async def readyz():
        if ready["value"] and batcher.running:
            return {"status": "ready", "waiting_images": batcher.waiting}
        return _problem(503, "not ready")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    max_body = int(options.max_upload_mb * 1_000_000)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body)
    return app
