"""Ray Serve application: ``serving.app:app`` (deploy with ``serve deploy serving/serve_config.yaml``).

One deployment, ``DetectorService``, behind a FastAPI ingress:

- ``POST /v1/detect``: an image as a multipart file (field ``file``) or as the raw body;
  returns pixel boxes, class names and scores, with the model version and class set that
  produced them. Bad uploads get a 4xx JSON error (see ``serving.images``).
- ``GET /v1/classes``: the served class set, in order.
- ``GET /healthz``: 200 with the served version once a model is loaded, 503 before.

CLIP refinement: a version registered with a fitted refiner (``fewshot.clip.refinement``: class
prompt embeddings and the fusion weight chosen on val, stored in the checkpoint) has its
detection scores fused with CLIP's box-crop classification by default; ``?refine=false``
turns it off per request and the ``refine`` setting for the whole deployment. Every answer
says in ``refinement`` whether it was applied and with which weight (and why not, when the
version has no refiner or its teacher cannot be loaded on this replica).

The replica loads ``models:/NAME@champion`` from MLflow when it starts and watches the alias
(every ``poll_interval_s``); a newly promoted version is loaded beside the current one and
swapped in with one assignment, so requests in flight finish on the model they started
with and none fails. ``reconfigure`` (Serve's ``user_config``) changes the settings live.
Inference is batched across concurrent requests with ``serve.batch``.
"""

import asyncio
import logging
import os
import tempfile
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from serving.images import ImageRejected, decode_upload

logger = logging.getLogger("ray.serve")

api = FastAPI(title="fewshot detector", version="1")

DEFAULTS = {
    "model_name": "fewshot-detector",
    "alias": "champion",
    "tracking_uri": None,  # None: $MLFLOW_TRACKING_URI
    "poll_interval_s": 5.0,
    "max_upload_bytes": 10 * 1024 * 1024,
    "max_pixels": 40_000_000,
    "score_threshold": 0.3,
    "refine": True,        # apply the version's CLIP refinement when it has one
    "teacher_spec": None,  # where the refiner's teacher lives on this replica (None: as stored)
}


@dataclass(frozen=True)
class Served:
    """One loaded model version; replaced whole, never mutated."""

    detector: object
    name: str
    version: int
    class_set: str
    classes: tuple[str, ...]
    refiner: object | None = None  # fewshot.clip.refinement.Refiner, teacher loaded
    refine_note: str = ""          # why there is no refiner

    def refinement(self, requested: bool) -> dict:
        """The ``refinement`` block of an answer."""
        if self.refiner is None:
            return {"applied": False, "fusion_weight": None, "reason": self.refine_note}
        if not requested:
            return {"applied": False, "fusion_weight": self.refiner.fusion_weight,
                    "reason": "turned off for this request"}
        return {"applied": True, "fusion_weight": self.refiner.fusion_weight,
                "teacher": self.refiner.teacher_id}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
@serve.ingress(api)
class DetectorService:
    def __init__(self, **settings):
        self.settings = {**DEFAULTS, **settings}
        self.served: Served | None = None
        self._load_lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        try:
            self._load_sync()
        except Exception as err:  # no champion yet, server briefly down: keep polling
            logger.warning("no model loaded at start: %s", err)

    # ---- model lifecycle -----------------------------------------------------------------
    def _tracking_uri(self) -> str | None:
        return self.settings["tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI")

    def _load_sync(self) -> bool:
        """Load the aliased version if it differs from the served one; True when swapped."""
        from fewshot.backends import registry
        from fewshot.model.inference import Detector

        uri, name = self._tracking_uri(), self.settings["model_name"]
        info = registry.get_alias(uri, name, self.settings["alias"])
        if info is None:
            raise LookupError(f"{name!r} has no '{self.settings['alias']}' version yet")
        current = self.served
        if current is not None and current.name == name and current.version == info.version:
            return False
        with tempfile.TemporaryDirectory() as d:
            detector = Detector.from_file(registry.download_checkpoint(uri, name, info.version, d))
        refiner, note = self._load_refiner(detector)
        self.served = Served(detector, name, info.version, info.class_set, tuple(detector.classes),
                             refiner, note)
        logger.info("serving %s version %d (%d classes, refinement: %s)", name, info.version,
                    len(detector.classes), "off: " + note if refiner is None else repr(refiner))
        return True

    def _load_refiner(self, detector) -> tuple[object | None, str]:
        """The version's refiner with its teacher loaded, or (None, why not)."""
        from fewshot.clip.refinement import EXTRA_KEY, Refiner

        extra = detector.checkpoint.extra or {}
        if EXTRA_KEY not in extra:
            return None, "this model version has no CLIP refiner"
        try:
            refiner = Refiner.from_extra(extra, teacher_spec=self.settings["teacher_spec"])
            if list(refiner.class_names) != list(detector.classes):
                return None, "the stored refiner's classes differ from the model's"
            refiner.teacher  # load it now, not on the first request
            return refiner, ""
        except Exception as err:  # missing teacher weights on this replica: serve unrefined
            logger.warning("CLIP refiner not loaded: %s", err)
            return None, f"the refiner's teacher could not be loaded here: {err}"

    async def _refresh(self) -> None:
        async with self._load_lock:
            await asyncio.to_thread(self._load_sync)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(float(self.settings["poll_interval_s"]))
            try:
                await self._refresh()
            except Exception as err:
                logger.warning("model refresh failed (still serving the current one): %s", err)

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def reconfigure(self, user_config: dict) -> None:
        unknown = set(user_config) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.settings = {**self.settings, **user_config}
        try:
            self._load_sync()
        except Exception as err:
            logger.warning("reconfigure: model not loaded: %s", err)

    # ---- inference -----------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _detect_batch(self, items: list[tuple]) -> list[dict]:
        served = self.served  # one reference for the whole batch: a swap cannot split it
        images = [img for img, _, _ in items]
        outputs = await asyncio.to_thread(served.detector.predict, images, 0.0)
        results = []
        for (img, threshold, refine), dets in zip(items, outputs):
            block = served.refinement(refine)
            if block["applied"]:
                dets = await asyncio.to_thread(served.refiner.refine, img, dets)
            results.append({
                "model": {"name": served.name, "version": served.version, "class_set": served.class_set},
                "image": {"width": img.width, "height": img.height},
                "refinement": block,
                "detections": [d for d in dets if d["score"] >= threshold],
            })
        return results

    # ---- HTTP ----------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        self._ensure_watcher()
        s = self.served
        if s is None:
            return _error(503, "no_model", "no model version is loaded yet")
        return {"status": "ok", "model": {"name": s.name, "version": s.version, "class_set": s.class_set}}

    @api.get("/v1/classes")
    async def classes(self):
        self._ensure_watcher()
        s = self.served
        if s is None:
            return _error(503, "no_model", "no model version is loaded yet")
        return {"model": {"name": s.name, "version": s.version, "class_set": s.class_set},
                "classes": list(s.classes)}

    @api.post("/v1/detect")
    async def detect(self, request: Request, score_threshold: float | None = None,
                     refine: bool | None = None):
        self._ensure_watcher()
        if self.served is None:
            return _error(503, "no_model", "no model version is loaded yet")
        threshold = self.settings["score_threshold"] if score_threshold is None else score_threshold
        if not 0.0 <= threshold <= 1.0:
            return _error(422, "bad_parameter", "score_threshold must be within [0, 1]")
        max_bytes = int(self.settings["max_upload_bytes"])
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
            return _error(413, "too_large", f"upload is {declared} bytes; the limit is {max_bytes}")
        ctype = request.headers.get("content-type", "")
        try:
            if ctype.startswith("multipart/form-data"):
                form = await request.form()
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    return _error(400, "missing_file", "multipart body has no file field named 'file'")
                data = await upload.read()
            else:
                data = await request.body()
            image = decode_upload(data, max_bytes, int(self.settings["max_pixels"]))
        except ImageRejected as err:
            return _error(err.status, err.code, err.message)
        want_refine = bool(self.settings["refine"]) if refine is None else refine
        return await self._detect_batch((image, threshold, want_refine))


app = DetectorService.bind()
