"""Glue: the MLflow pyfunc flavour of a detector version.

``mlflow.pyfunc.load_model("models:/fewshot-detector@champion").predict(images)`` works for
any MLflow user: the input is a list of encoded images (bytes) or a DataFrame with an ``image``
column of bytes; the output is one list of detections per image.
"""
from __future__ import annotations

import io

import mlflow.pyfunc


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from fewshot.model.inference import Detector

        self.detector = Detector.from_file(context.artifacts["detector"])

    def predict(self, context, model_input, params=None):
        from PIL import Image

        if hasattr(model_input, "columns"):
            model_input = list(model_input["image"])
        threshold = float((params or {}).get("score_threshold", 0.3))
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in model_input]
        return self.detector.predict(images, score_threshold=threshold)
