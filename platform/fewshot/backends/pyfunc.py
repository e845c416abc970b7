"""Glue: the MLflow pyfunc flavour of a detector version.

``mlflow.pyfunc.load_model("models:/fewshot-detector@champion").predict(df, params={...})``
answers exactly as Ray Serve's ``/v1/detect`` does for the same version: both decode with
:func:`fewshot.model.image_input.decode_image` and answer with :class:`fewshot.clip.answering.Answerer`
(detector, then the version's CLIP refinement when it has one).

- input: a DataFrame with an ``image`` column of encoded bytes (``mlflow models serve``
  takes it as ``dataframe_split`` with base64 strings), or a plain list of bytes;
- params (the signature's params schema, so MLflow passes them on): ``score_threshold``
  (double, default 0.3) and ``refine`` (boolean, default true);
- output: one list of detections per image, ``{"box", "label", "score"}`` plus
  ``det_score``/``clip_score`` when refined.

The refiner's teacher travels with the version as the ``teacher`` artifact when it is an
embedded teacher file (:func:`pyfunc_artifacts`); ``model_config={"teacher_spec": ...}``
points elsewhere, ``model_config={"device": "cuda"}`` runs on a GPU (default CPU).

Versions logged by older code (no signature, no teacher artifact) keep loading: the class
keeps its name and reads only ``context.artifacts["detector"]``.
"""
from __future__ import annotations

import io
from pathlib import Path

import mlflow.pyfunc

DEFAULT_SCORE_THRESHOLD = 0.3


def signature():
    """Input ``image`` (binary), params ``score_threshold`` and ``refine``; output: JSON."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        params=ParamSchema([ParamSpec("score_threshold", "double", DEFAULT_SCORE_THRESHOLD),
                            ParamSpec("refine", "boolean", True)]),
    )


def input_example():
    """A one-row DataFrame holding a small plain PNG."""
    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()]})


def pyfunc_artifacts(checkpoint_path: str | Path) -> dict[str, str]:
    """``detector`` and, when the checkpoint's refiner uses an embedded teacher file that
    exists here, ``teacher`` (so the version answers refined on any machine)."""
    from fewshot.model.checkpoint import load_checkpoint
    from fewshot.clip.refinement import EXTRA_KEY
    from fewshot.clip.teacher import parse_teacher_spec

    artifacts = {"detector": str(checkpoint_path)}
    data = (load_checkpoint(checkpoint_path).extra or {}).get(EXTRA_KEY)
    spec = (data or {}).get("teacher_spec") or ""
    if spec:
        try:
            parsed = parse_teacher_spec(spec)
        except ValueError:
            return artifacts
        if parsed.kind == "embedded" and Path(parsed.source).expanduser().is_file():
            artifacts["teacher"] = str(Path(parsed.source).expanduser().resolve())
    return artifacts


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from fewshot.clip.answering import Answerer, load_refiner, resolve_device
        from fewshot.model.inference import Detector

        config = dict(getattr(context, "model_config", None) or {})
        device = resolve_device(config.get("device", "cpu"))
        self.detector = Detector.from_file(context.artifacts["detector"], device=device)
        teacher_spec = config.get("teacher_spec")
        if not teacher_spec and context.artifacts.get("teacher"):
            teacher_spec = f"embedded:{context.artifacts['teacher']}"
        self.refiner, self.refine_note = load_refiner(self.detector, teacher_spec=teacher_spec,
                                                      device=device)
        self.answerer = Answerer(self.detector, self.refiner)

    def predict(self, context, model_input, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from fewshot.clip.answering import Item
        from fewshot.model.image_input import ImageError, decode_image

        if not hasattr(self, "answerer"):  # an instance unpickled without load_context
            raise MlflowException("load the model with mlflow.pyfunc.load_model first")
        params = params or {}
        threshold = float(params.get("score_threshold", DEFAULT_SCORE_THRESHOLD))
        refine = bool(params.get("refine", True))
        if hasattr(model_input, "columns"):
            model_input = list(model_input["image"])
        items = []
        for i, data in enumerate(model_input):
            try:
                decoded = decode_image(bytes(data), model_size=self.answerer.model_size)
            except ImageError as err:
                raise MlflowException(f"image {i}: {err.message}", INVALID_PARAMETER_VALUE) from None
            items.append(Item(decoded, threshold, refine))
        out = []
        for i, result in enumerate(self.answerer.answer(items)):
            if isinstance(result, Exception):
                raise MlflowException(f"image {i}: {type(result).__name__}: {result}")
            out.append(result)
        return out
