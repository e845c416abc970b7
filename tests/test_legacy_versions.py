"""Versions registered before the learning core moved into rooms keep loading and answer the
same: the fixture was saved by the code at commit b95296c (tests/fixtures/README.md)."""
import io
import json
from pathlib import Path

import mlflow
from PIL import Image

from fewshot.model.checkpoint import load_checkpoint
from fewshot.model.inference import Detector

FIXTURE = Path(__file__).parent / "fixtures"


def _image() -> bytes:
    spec = json.loads((FIXTURE / "legacy_pyfunc_v0.expected.json").read_text())["image"]
    buf = io.BytesIO()
    Image.new("RGB", tuple(spec["size"]), tuple(spec["rgb"])).save(buf, format="PNG")
    return buf.getvalue()


def test_old_pyfunc_model_loads_and_predicts_the_same():
    expected = json.loads((FIXTURE / "legacy_pyfunc_v0.expected.json").read_text())["predictions"]
    model = mlflow.pyfunc.load_model(str(FIXTURE / "legacy_pyfunc_v0"))
    assert type(model.unwrap_python_model()).__qualname__ == "DetectorPyfunc"
    got = model.predict([_image()])
    assert len(got) == 1 and len(got[0]) > 0

    # the same detections; the order of near-tied scores (and so which ties make the cut at
    # the last places) depends on the CPU thread count, so compare the confident ones as sets
    def same(g, e):
        return (g["label"] == e["label"] and abs(g["score"] - e["score"]) < 1e-3
                and all(abs(a - b) < 0.05 for a, b in zip(g["box"], e["box"])))

    confident = [e for e in expected[0] if e["score"] >= 0.5]
    assert len(confident) >= 10
    for e in confident:
        assert any(same(g, e) for g in got[0]), e


def test_old_checkpoint_loads_strictly_in_todays_detector():
    ckpt = load_checkpoint(FIXTURE / "legacy_pyfunc_v0" / "artifacts" / "detector.pt")
    assert ckpt.classes == ["circle", "square"] and ckpt.config.backbone_width == 8
    detector = Detector.from_file(FIXTURE / "legacy_pyfunc_v0" / "artifacts" / "detector.pt")
    out = detector.predict([Image.open(io.BytesIO(_image())).convert("RGB")], score_threshold=0.3)
    assert out and {d["label"] for d in out[0]} <= {"circle", "square"}
