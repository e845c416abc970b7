"""Ray Serve application: ``serving.app:app`` (deploy with ``serve deploy serving/serve_config.yaml``).

One deployment, ``DetectorService``, behind a typed FastAPI ingress (``/docs``,
``/openapi.json`` describe every route, field and error):

- ``POST /v1/detect``: an image as a multipart file (field ``file``) or as the raw body;
  query ``score_threshold`` (0..1) and ``refine`` (bool). Answers pixel boxes, class names
  and scores with the model version and class set that produced them (:class:`DetectResponse`).
- ``GET /v1/classes``: the served class set, in order.
- ``GET /healthz``: 200 with the served version once a model is loaded, 503 before.

Every 4xx/5xx the application answers is ``{"error": {"code", "message"}}`` (:class:`ErrorResponse`).
(Serve's proxy itself answers plain-text 408 after ``http_options.request_timeout_s`` and
503 when the deployment is overloaded or down.)

Bounded resources, per request: the body is read as a stream and refused once it passes
``max_upload_bytes`` (whatever Content-Length says) or when it has not arrived in
``read_timeout_s``; the image's header is checked against ``max_pixels`` before decoding
(JPEGs are decoded as a DCT draft no smaller than the detector's input); at most
``decode_concurrency`` decodes run at once; decoded images are reduced to about the
detector's input size before they wait for a batch.

Isolation: decoding, the detector, CLIP refinement and formatting run per item inside error
handling (:class:`fewshot.clip.answering.Answerer`): an item that fails gets its own error and
the other requests of its ``serve.batch`` are answered.

Lifecycle: the replica loads ``models:/NAME@ALIAS`` in ``__init__`` and starts the alias
watcher there; the watcher and ``reconfigure`` load under one lock; a new version is loaded
and warmed up completely beside the current one, then swapped in with one assignment.
``check_health`` fails when no model is loaded, the watcher died, or inference keeps failing.

One answer everywhere: the MLflow pyfunc flavour (``fewshot.backends.pyfunc``) answers through
the same :class:`~fewshot.clip.answering.Answerer` and decoder.

Metrics (``ray.serve.metrics``, exported by Ray's metrics agent in Prometheus format,
names prefixed ``ray_``): ``fewshot_requests`` / ``fewshot_errors`` (route, code,
model_version, error), ``fewshot_request_latency_ms`` (route), ``fewshot_boxes_per_image``,
``fewshot_refinement`` (applied), ``fewshot_batch_size``, ``fewshot_model_swaps``.
"""

import asyncio
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.images import ImageRejected, decode_upload, image_bytes

logger = logging.getLogger("ray.serve")


# ---- settings (Serve's user_config) ----------------------------------------------------------

class ServiceSettings(BaseModel):
    """The deployment's settings: application arguments and ``user_config`` (applied live)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = "fewshot-detector"
    alias: str = "champion"
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI")
    poll_interval_s: float = Field(5.0, gt=0)
    max_upload_bytes: int = Field(10 * 1024 * 1024, gt=0)
    max_pixels: int = Field(12_000_000, gt=0, description="decoded pixels (JPEGs after their draft step)")
    read_timeout_s: float = Field(10.0, gt=0, description="the whole body must arrive within this")
    decode_concurrency: int = Field(2, ge=1, description="decodes at once per replica")
    score_threshold: float = Field(0.3, ge=0, le=1)
    refine: bool = Field(True, description="apply the version's CLIP refinement when it has one")
    teacher_spec: str | None = Field(None, description="where the refiner's teacher lives here "
                                                       "(None: the version's teacher artifact, else as stored)")
    device: str = Field("cpu", description="'cpu', 'cuda' (the GPU Ray gives the replica) or 'auto'")
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    require_model_for_health: bool = Field(True, description="check_health fails while no model is loaded")


DEFAULTS = ServiceSettings().model_dump()


# ---- API models ----------------------------------------------------------------------------

class ErrorBody(BaseModel):
    code: str = Field(..., description="machine-readable, e.g. too_large, corrupt_image, no_model")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelRef(BaseModel):
    name: str
    version: int
    class_set: str
    scoring: str = Field(description="how the version scores its classes: 'joint' (one softmax over every "
                                     "class) or 'per-increment' (each class against the classes that existed "
                                     "when it was added); add_classes --scoring auto chose it on val")
    retained_heads: int = Field(0, description="frozen heads of earlier versions that answer the older classes "
                                               "exactly as those versions did (per-increment scoring with "
                                               "add_classes --retain-heads; 0 otherwise)")


class ImageSize(BaseModel):
    width: int
    height: int


class Refinement(BaseModel):
    applied: bool
    fusion_weight: float | None = Field(None, description="lambda of the version's refiner")
    teacher: str | None = Field(None, description="the CLIP teacher's id, when applied")
    reason: str | None = Field(None, description="why not applied")


class Detection(BaseModel):
    box: list[float] = Field(..., min_length=4, max_length=4, description="x1, y1, x2, y2 in upload pixels")
    label: str
    score: float = Field(..., description="the fused score when refined, else the detector's")
    det_score: float | None = Field(None, description="the detector's score (refined answers)")
    clip_score: float | None = Field(None, description="CLIP's probability of the label (refined answers)")


class DetectResponse(BaseModel):
    model: ModelRef
    image: ImageSize
    refinement: Refinement
    detections: list[Detection]


class ClassesResponse(BaseModel):
    model: ModelRef
    classes: list[str]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: ModelRef


def _errors(*codes: int) -> dict:
    text = {400: "bad request (empty body, bad multipart)", 404: "no such route",
            405: "method not allowed", 408: "the body did not arrive in time",
            413: "too many bytes or pixels", 415: "not an image", 422: "bad parameter, "
            "corrupt image or a shape the detector cannot take", 500: "inference failed",
            503: "no model version loaded yet"}
    return {c: {"model": ErrorResponse, "description": text[c]} for c in codes}


api = FastAPI(title="fewshot detector", version="2",
              description="Few-shot object detection served from the MLflow registry. "
                          "Every error is {\"error\": {\"code\", \"message\"}}.",
              responses=_errors(404, 405))


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
               413: "too_large", 415: "unsupported_media_type", 422: "bad_parameter",
               429: "too_many_requests", 500: "internal", 503: "unavailable"}


_REPLICA: "DetectorService | None" = None  # this process's replica, for the handlers' metrics


def _record_framework_error(request: Request, status: int, code: str) -> None:
    if _REPLICA is not None:
        route = request.url.path if request.url.path in ("/healthz", "/v1/classes", "/v1/detect") else "other"
        _REPLICA._record(route, status, time.perf_counter(), code)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    _record_framework_error(request, exc.status_code, code)
    return _error(exc.status_code, code, str(exc.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{where}: {e.get('msg')}")
    _record_framework_error(request, 422, "bad_parameter")
    return _error(422, "bad_parameter", "; ".join(parts) or "invalid request")


# ---- metrics -------------------------------------------------------------------------------

class Metrics:
    """The replica's ray.serve.metrics (created in the replica, never at import)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        keys = ("route", "code", "model_version")
        self.requests = Counter("fewshot_requests", "HTTP requests answered", tag_keys=keys)
        self.errors = Counter("fewshot_errors", "HTTP requests answered with a 4xx/5xx",
                              tag_keys=keys + ("error",))
        self.latency = Histogram("fewshot_request_latency_ms", "request latency in the replica (ms)",
                                 boundaries=[5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
                                 tag_keys=("route",))
        self.boxes = Histogram("fewshot_boxes_per_image", "detections answered per image",
                               boundaries=[0.5, 1.5, 2.5, 5.5, 10.5, 20.5, 50.5, 100.5],
                               tag_keys=("model_version",))
        self.refinement = Counter("fewshot_refinement", "answers by whether CLIP refinement was applied",
                                  tag_keys=("model_version", "applied"))
        self.batch_size = Histogram("fewshot_batch_size", "images per serve.batch call",
                                    boundaries=[1.5, 2.5, 4.5, 8.5, 16.5, 32.5])
        self.swaps = Counter("fewshot_model_swaps", "model versions swapped in", tag_keys=("model_version",))
        self.version = Gauge("fewshot_model_version", "the served model version (0: none)")


# ---- the served model ------------------------------------------------------------------------

@dataclass(frozen=True)
class Served:
    """One loaded model version; replaced whole, never mutated."""

    answerer: object  # fewshot.clip.answering.Answerer, warmed up
    name: str
    version: int
    class_set: str
    classes: tuple[str, ...]
    key: tuple        # what was loaded: (name, version, device, teacher spec setting)
    refiner: object | None = None
    refine_note: str = ""
    scoring: str = "joint"
    retained_heads: int = 0

    @property
    def ref(self) -> dict:
        return {"name": self.name, "version": self.version, "class_set": self.class_set,
                "scoring": self.scoring, "retained_heads": self.retained_heads}

    def refinement(self, requested: bool) -> dict:
        """The ``refinement`` block of an answer."""
        if self.refiner is None:
            return {"applied": False, "fusion_weight": None, "reason": self.refine_note}
        if not requested:
            return {"applied": False, "fusion_weight": self.refiner.fusion_weight,
                    "reason": "turned off for this request"}
        return {"applied": True, "fusion_weight": self.refiner.fusion_weight,
                "teacher": self.refiner.teacher_id}


class InferenceFailed(Exception):
    pass


def _teacher_artifact(checkpoint_path: Path) -> Path | None:
    """The ``teacher`` artifact logged beside the version's ``detector`` (see
    ``fewshot.backends.pyfunc.pyfunc_artifacts``), when there is one."""
    import yaml

    for root in (checkpoint_path.parent.parent, checkpoint_path.parent):
        mlmodel = root / "MLmodel"
        if mlmodel.is_file():
            meta = yaml.safe_load(mlmodel.read_text()) or {}
            art = ((meta.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
            rel = (art.get("teacher") or {}).get("path")
            if rel and (root / rel).is_file():
                return root / rel
    return None


DETECT_BODY = {
    "requestBody": {
        "required": True,
        "description": "the image: a multipart file named 'file', or the raw bytes as the body",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32,
                  health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class DetectorService:
    async def __init__(self, **settings):
        self.settings = ServiceSettings(**settings)
        self.served: Served | None = None
        self._lock = asyncio.Lock()  # reconfigure and the watcher load under it, one at a time
        self._decode_slots = asyncio.Semaphore(self.settings.decode_concurrency)
        self._failed_batches = 0     # consecutive batches in which every item failed
        self.metrics = Metrics()
        self.metrics.version.set(0)
        global _REPLICA
        _REPLICA = self
        try:
            await self._refresh()
        except Exception as err:  # no champion yet, server briefly down: the watcher keeps polling
            logger.warning("no model loaded at start: %s", err)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    # ---- model lifecycle -----------------------------------------------------------------
    def _tracking_uri(self) -> str | None:
        return self.settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")

    def _load_sync(self, settings: ServiceSettings) -> Served | None:
        """A fully loaded, warmed-up Served for the aliased version, or None when the one
        served already is it."""
        from fewshot.backends import registry
        from fewshot.clip.answering import Answerer, load_refiner, resolve_device
        from fewshot.model.inference import Detector

        uri, name = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), settings.model_name
        info = registry.get_alias(uri, name, settings.alias)
        if info is None:
            raise LookupError(f"{name!r} has no '{settings.alias}' version yet")
        device = resolve_device(settings.device)
        key = (name, info.version, str(device), settings.teacher_spec)
        current = self.served
        if current is not None and current.key == key:
            return None
        with tempfile.TemporaryDirectory() as d:
            path = registry.download_checkpoint(uri, name, info.version, d)
            detector = Detector.from_file(path, device=device)
            spec = settings.teacher_spec
            if not spec:
                carried = _teacher_artifact(path)
                spec = f"embedded:{carried}" if carried else None
            refiner, note = load_refiner(detector, teacher_spec=spec, device=device)
        if note and refiner is None and "no CLIP refiner" not in note:
            logger.warning("CLIP refiner not loaded: %s", note)
        answerer = Answerer(detector, refiner)
        answerer.warmup()  # a version that cannot answer fails here, before it is served
        heads = detector.model.roi_heads
        scoring = heads.box_predictor.cls_score.scoring
        return Served(answerer, name, info.version, info.class_set, tuple(detector.classes), key,
                      refiner, note, scoring, len(heads.retained) if scoring == "per-increment" else 0)

    async def _refresh(self, settings: ServiceSettings | None = None) -> bool:
        async with self._lock:
            settings = settings or self.settings
            new = await asyncio.to_thread(self._load_sync, settings)
            self.settings = settings
            if new is None:
                return False
            self.served = new  # one assignment: requests in flight keep the one they started with
            self.metrics.swaps.inc(tags={"model_version": str(new.version)})
            self.metrics.version.set(new.version)
            logger.info("serving %s version %d (%d classes, refinement: %s, device %s)", new.name,
                        new.version, len(new.classes),
                        "off: " + new.refine_note if new.refiner is None else repr(new.refiner), new.key[2])
            return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(float(self.settings.poll_interval_s))
            try:
                await self._refresh()
            except Exception as err:
                logger.warning("model refresh failed (still serving the current one): %s", err)

    async def reconfigure(self, user_config: dict) -> None:
        settings = ServiceSettings(**{**self.settings.model_dump(), **(user_config or {})})
        self._detect_batch.set_max_batch_size(settings.max_batch_size)
        self._detect_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        if settings.decode_concurrency != self.settings.decode_concurrency:
            self._decode_slots = asyncio.Semaphore(settings.decode_concurrency)
        try:
            await self._refresh(settings)
        except Exception as err:
            self.settings = settings
            logger.warning("reconfigure: model not loaded: %s", err)

    def check_health(self) -> None:
        if self._watcher.done():
            raise RuntimeError(f"the model watcher stopped: {self._watcher.exception()!r}")
        if self.served is None and self.settings.require_model_for_health:
            raise RuntimeError("no model version is loaded")
        if self._failed_batches >= 5:
            raise RuntimeError(f"the last {self._failed_batches} inference batches all failed")

    # ---- inference -----------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _detect_batch(self, items: list[tuple]) -> list[dict | Exception]:
        from fewshot.clip.answering import Item

        served = self.served  # one reference for the whole batch: a swap cannot split it
        self.metrics.batch_size.observe(len(items))
        batch = [Item(decoded, threshold, refine) for decoded, threshold, refine in items]
        try:
            outputs = await asyncio.to_thread(served.answerer.answer, batch)
        except Exception as err:  # Answerer returns per-item errors; this is a last resort
            outputs = [err] * len(items)
        self._failed_batches = self._failed_batches + 1 if all(isinstance(o, Exception) for o in outputs) else 0
        version = str(served.version)
        results = []
        for (decoded, _, refine), dets in zip(items, outputs):
            if isinstance(dets, Exception):
                logger.warning("inference failed for one image of a batch of %d: %r", len(items), dets)
                results.append(InferenceFailed(f"{type(dets).__name__}: {dets}"))
                continue
            block = served.refinement(refine)
            self.metrics.boxes.observe(len(dets), tags={"model_version": version})
            self.metrics.refinement.inc(tags={"model_version": version, "applied": str(block["applied"]).lower()})
            results.append({
                "model": served.ref,
                "image": {"width": decoded.width, "height": decoded.height},
                "refinement": block,
                "detections": dets,
            })
        return results

    # ---- HTTP ----------------------------------------------------------------------------
    def _record(self, route: str, status: int, started: float, error: str = "") -> None:
        s = self.served
        tags = {"route": route, "code": str(status), "model_version": str(s.version) if s else "none"}
        self.metrics.requests.inc(tags=tags)
        if status >= 400:
            self.metrics.errors.inc(tags={**tags, "error": error})
        self.metrics.latency.observe((time.perf_counter() - started) * 1000.0, tags={"route": route})

    def _fail(self, route: str, started: float, status: int, code: str, message: str) -> JSONResponse:
        self._record(route, status, started, code)
        return _error(status, code, message)

    @api.get("/healthz", response_model=HealthResponse, responses=_errors(503))
    async def healthz(self):
        started = time.perf_counter()
        s = self.served
        if s is None:
            return self._fail("/healthz", started, 503, "no_model", "no model version is loaded yet")
        self._record("/healthz", 200, started)
        return {"status": "ok", "model": s.ref}

    @api.get("/v1/classes", response_model=ClassesResponse, responses=_errors(503))
    async def classes(self):
        started = time.perf_counter()
        s = self.served
        if s is None:
            return self._fail("/v1/classes", started, 503, "no_model", "no model version is loaded yet")
        self._record("/v1/classes", 200, started)
        return {"model": s.ref, "classes": list(s.classes)}

    @api.post("/v1/detect", response_model=DetectResponse, response_model_exclude_none=True,
              responses=_errors(400, 408, 413, 415, 422, 500, 503), openapi_extra=DETECT_BODY)
    async def detect(
        self,
        request: Request,
        score_threshold: float | None = Query(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                              description="drop detections scoring below (default: the deployment's)"),
        refine: bool | None = Query(None, description="CLIP refinement on/off (default: the deployment's)"),
    ):
        route, started = "/v1/detect", time.perf_counter()
        try:
            served = self.served
            if served is None:
                return self._fail(route, started, 503, "no_model", "no model version is loaded yet")
            cfg = self.settings
            threshold = cfg.score_threshold if score_threshold is None else float(score_threshold)
            if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
                return self._fail(route, started, 422, "bad_parameter", "score_threshold must be within [0, 1]")
            data = await image_bytes(request, cfg.max_upload_bytes, cfg.read_timeout_s)
            async with self._decode_slots:
                decoded = await asyncio.to_thread(decode_upload, data, cfg.max_upload_bytes,
                                                  cfg.max_pixels, served.answerer.model_size)
            del data
            want_refine = cfg.refine if refine is None else bool(refine)
            result = await self._detect_batch((decoded, threshold, want_refine))
            if isinstance(result, InferenceFailed):
                return self._fail(route, started, 500, "inference_failed",
                                  f"the detector could not process this image: {result}")
            self._record(route, 200, started)
            return result
        except ImageRejected as err:
            return self._fail(route, started, err.status, err.code, err.message)
        except Exception as err:  # never a bare 500 from the framework
            logger.exception("detect failed")
            return self._fail(route, started, 500, "internal", f"{type(err).__name__}: {err}")


app = DetectorService.bind()


def build_app(args: dict) -> serve.Application:
    """Typed application builder: ``serve run serving.app:build_app model_name=... device=cuda``."""
    return DetectorService.bind(**ServiceSettings(**args).model_dump(exclude_unset=True))
