"""The Serve endpoint over real HTTP, with a real MLflow server: typed API, hostile inputs,
property-based requests from the OpenAPI schema, isolation, metrics, hot swap, and the same
answer from ``mlflow.pyfunc.load_model(...).predict`` as from ``/v1/detect``.

One Ray cluster and one Serve application for the module (a small untrained detector with
a CLIP refiner on the embedded teacher); every test leaves the replica serving.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from imagegen import encode, scene
from services import free_port

MODEL = "serving-api-detector"
CLASSES = ["circle", "square", "triangle"]
pytestmark = pytest.mark.integration


# ---- images ----------------------------------------------------------------------------------



def png_header(w: int, h: int, idat: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat or zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def zlib_bomb_png(w: int, h: int) -> bytes:
    """A valid PNG of w x h black pixels: a few KB that inflate to w*h*3 bytes."""
    raw = (b"\x00" + b"\x00" * (w * 3)) * h
    return png_header(w, h, zlib.compress(raw, 9))


# ---- the stack ------------------------------------------------------------------------------

@dataclass
class Stack:
    url: str
    mlflow_uri: str
    metrics_url: str
    version: int
    replica_pid: int


def make_checkpoint(path: Path, teacher_spec: str | None, fusion_weight: float = 0.5, seed: int = 0,
                    class_set: str = "cs-serving") -> Path:
    import torch

    from fewshot.model.checkpoint import save_checkpoint, update_extra
    from fewshot.model.presets import preset
    from fewshot.model.detector import build_detector

    cfg = preset("cpu-small")
    torch.manual_seed(seed)
    save_checkpoint(path, build_detector(cfg, len(CLASSES) + 1), cfg, CLASSES, [1, 2, 3], "synthworld", class_set)
    if teacher_spec:
        from fewshot.clip.refinement import Refiner
        from fewshot.clip.teacher import load_teacher

        update_extra(path, Refiner.build(load_teacher(teacher_spec), CLASSES, fusion_weight=fusion_weight).to_extra())
    return path


def register(uri: str, path: Path, alias: bool = True):
    import mlflow

    from fewshot.backends import registry

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serving-api")
    with mlflow.start_run():
        v = registry.register_detector(uri, MODEL, path, classes=CLASSES, class_set="cs-serving",
                                       parent_version=None, shots=None)
    if alias:
        registry.set_alias(uri, MODEL, registry.CHAMPION, v.version)
    return v


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def replica_pid() -> int:
    """The pid of this test's DetectorService replica: its process title names it and it
    descends from this process (``ray.init(address="local")`` starts the raylet as a child)."""
    import os

    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if "ServeReplica:serving-api:DetectorService" not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            pid = int(proc.name)
            while pid > 1 and pid != os.getpid():
                pid = _ppid(pid)
        except OSError:
            continue
        if pid == os.getpid():
            found.append(int(proc.name))
    assert len(found) == 1, found
    return found[0]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, mlflow_uri, tiny_teacher_spec):
    import ray
    from ray import serve

    from serving.app import DetectorService

    teacher_file = tiny_teacher_spec.split(":", 1)[1]
    ckpt = make_checkpoint(tmp_path_factory.mktemp("v1") / "detector.pt", tiny_teacher_spec)
    v1 = register(mlflow_uri, ckpt)
    metrics_port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        serve.run(DetectorService.options(user_config={
            "model_name": MODEL, "tracking_uri": mlflow_uri, "poll_interval_s": 1.0, "score_threshold": 0.0,
            "max_upload_bytes": 2 * 1024 * 1024, "max_pixels": 4_000_000, "read_timeout_s": 3.0,
            "max_batch_size": 4, "batch_wait_timeout_s": 0.01}).bind(), name="serving-api", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/healthz", timeout=30).json()["model"]["version"] == v1.version
        Path(teacher_file)  # the replica loaded the teacher from the version's artifact, see below
        yield Stack(url, mlflow_uri, f"http://127.0.0.1:{metrics_port}/metrics", v1.version, replica_pid())
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def post(stack: Stack, timeout=60, **kwargs):
    return requests.post(f"{stack.url}/v1/detect", timeout=timeout, **kwargs)


# ---- the typed API ----------------------------------------------------------------------------

def test_openapi_describes_every_route_field_and_error(stack):
    spec = requests.get(f"{stack.url}/openapi.json", timeout=10).json()
    assert requests.get(f"{stack.url}/docs", timeout=10).status_code == 200
    detect = spec["paths"]["/v1/detect"]["post"]
    assert set(detect["requestBody"]["content"]) >= {"multipart/form-data", "application/octet-stream"}
    assert {p["name"] for p in detect["parameters"]} == {"score_threshold", "refine"}
    for code in ("400", "408", "413", "415", "422", "500", "503"):
        assert detect["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert detect["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/DetectResponse")
    schemas = spec["components"]["schemas"]
    assert set(schemas["Detection"]["properties"]) == {"box", "label", "score", "det_score", "clip_score"}
    assert set(schemas["ErrorBody"]["required"]) == {"code", "message"}
    for path in ("/healthz", "/v1/classes"):
        assert "503" in spec["paths"][path]["get"]["responses"]


def test_multipart_and_raw_body_answer_the_same(stack):
    img = encode(scene())
    raw = post(stack, data=img)
    multi = post(stack, files={"file": ("x.png", img, "image/png")})
    assert raw.status_code == multi.status_code == 200
    assert raw.json() == multi.json()
    body = raw.json()
    assert body["model"]["version"] == stack.version and body["image"] == {"width": 160, "height": 120}
    assert body["model"]["scoring"] == "joint"   # a base model: one increment, one softmax
    # the teacher came with the version (its artifact): refinement applied by default
    assert body["refinement"]["applied"] is True and body["refinement"]["fusion_weight"] == 0.5
    assert body["detections"] and all("det_score" in d and "clip_score" in d for d in body["detections"])
    off = post(stack, data=img, params={"refine": "false"}).json()
    assert off["refinement"] == {"applied": False, "fusion_weight": 0.5, "reason": "turned off for this request"}
    assert all(set(d) == {"box", "label", "score"} for d in off["detections"])


# ---- hostile inputs ---------------------------------------------------------------------------

def chunked_post(stack: Stack, total: int, chunk: int = 64 * 1024) -> int:
    """Stream ``total`` bytes with Transfer-Encoding: chunked (no Content-Length)."""
    def gen():
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            sent += n
            yield b"\xff" * n
    try:
        return post(stack, data=gen(), timeout=60).status_code
    except requests.ConnectionError:  # the server may close once it has refused the body
        return -1


def slow_post(stack: Stack, seconds: float) -> int:
    """Declare 100 KB, send 10 bytes, then stall: a slow client."""
    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Content-Length: 100000\r\n\r\n\x89PNG\r\n\x1a\n\x00\x00")
        s.settimeout(seconds)
        data = s.recv(4096)
    return int(data.split(b" ")[1]) if data.startswith(b"HTTP/") else -1


def hostile_corpus() -> list[tuple[str, dict, set[int]]]:
    """(name, requests.post kwargs, acceptable statuses)."""
    good = encode(scene())
    jpeg = encode(scene(), "JPEG")
    rng = np.random.default_rng(1)
    cases: list[tuple[str, dict, set[int]]] = [
        ("empty", {"data": b""}, {400}),
        ("json", {"json": {"image": "abc"}}, {415}),
        ("text", {"data": "hello", "headers": {"Content-Type": "text/plain"}}, {415}),
        ("too_large_declared", {"data": b"\x00" * (3 * 1024 * 1024)}, {413}),
        ("pixel_bomb_header", {"data": png_header(30000, 30000)}, {413}),
        ("pixel_bomb_under_pil_limit", {"data": png_header(5000, 5000)}, {413}),
        ("zlib_bomb", {"data": zlib_bomb_png(3000, 3000)}, {413}),
        ("extreme_aspect", {"data": encode(Image.new("RGB", (8000, 3)))}, {422}),
        ("tall_aspect", {"data": encode(Image.new("RGB", (2, 3000)))}, {422}),
        ("one_pixel", {"data": encode(Image.new("RGB", (1, 1)))}, {200}),
        ("multipart_no_file", {"files": {"other": ("x.png", good, "image/png")}}, {400}),
        ("multipart_text_field", {"data": {"file": "not a file"},
                                  "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, {400}),
        ("multipart_broken", {"data": b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                              "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, {400, 415, 422}),
        ("threshold_negative", {"data": good, "params": {"score_threshold": "-1"}}, {422}),
        ("threshold_huge", {"data": good, "params": {"score_threshold": "1e308"}}, {422}),
        ("threshold_nan", {"data": good, "params": {"score_threshold": "nan"}}, {422}),
        ("threshold_text", {"data": good, "params": {"score_threshold": "abc"}}, {422}),
        ("refine_text", {"data": good, "params": {"refine": "maybe"}}, {422}),
        ("gif", {"data": encode(scene().convert("P"), "GIF")}, {200}),
        ("bmp", {"data": encode(scene(), "BMP")}, {200}),
        ("webp", {"data": encode(scene(), "WEBP")}, {200}),
        ("tiff", {"data": encode(scene(), "TIFF")}, {200}),
        ("grey16", {"data": encode(Image.fromarray(np.full((40, 50), 40000, np.uint16)))}, {200}),
        ("cmyk_jpeg", {"data": encode(scene().convert("CMYK"), "JPEG")}, {200}),
        ("rgba", {"data": encode(scene().convert("RGBA"))}, {200}),
    ]
    for i in range(1, 40):  # truncations
        cut = int(len(good) * i / 40)
        cases.append((f"truncated_png_{i}", {"data": good[:cut]}, {200, 400, 415, 422}))
        cases.append((f"truncated_jpeg_{i}", {"data": jpeg[:int(len(jpeg) * i / 40)]}, {200, 400, 415, 422}))
    for i in range(60):  # byte mutations
        data = bytearray(good if i % 2 else jpeg)
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        cases.append((f"mutated_{i}", {"data": bytes(data)}, {200, 400, 413, 415, 422}))
    for i in range(20):  # random bytes, some with an image magic prefix
        prefix = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM"][i % 5]
        cases.append((f"random_{i}", {"data": prefix + rng.bytes(int(rng.integers(1, 5000)))},
                      {200, 400, 413, 415, 422}))
    return cases


def test_hostile_inputs_get_4xx_json_and_the_replica_survives(stack):
    before_pid = stack.replica_pid
    cases = hostile_corpus()
    statuses: dict[str, int] = {}

    def run(case):
        name, kwargs, _ = case
        r = post(stack, **kwargs)
        if r.status_code >= 400:
            err = r.json()["error"]  # the one error model, whatever went wrong
            assert set(err) == {"code", "message"} and err["message"], (name, err)
        return name, r.status_code

    with ThreadPoolExecutor(8) as pool:
        statuses.update(pool.map(run, cases))
    # methods, routes, and raw-socket abuse
    for method in ("get", "put", "delete", "patch"):
        r = requests.request(method, f"{stack.url}/v1/detect", timeout=10)
        statuses[f"{method}_detect"] = r.status_code
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = requests.post(f"{stack.url}/v1/classes", timeout=10)
    statuses["post_classes"] = r.status_code
    assert r.status_code == 405
    r = requests.get(f"{stack.url}/no/such/route", timeout=10)
    statuses["no_route"] = r.status_code
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    statuses["chunked_oversize"] = chunked_post(stack, 20 * 1024 * 1024)
    assert statuses["chunked_oversize"] in (413, -1)
    statuses["slow_client"] = slow_post(stack, seconds=20)
    assert statuses["slow_client"] == 408

    bad = {n: s for n, s in statuses.items() if s >= 500}
    assert not bad, bad
    wrong = {n: statuses[n] for n, _, ok in cases if statuses[n] not in ok}
    assert not wrong, wrong
    assert len(statuses) >= 190
    # still serving, same replica, memory bounded
    assert requests.get(f"{stack.url}/healthz", timeout=10).status_code == 200
    assert post(stack, data=encode(scene())).status_code == 200
    assert replica_pid() == before_pid
    peak = peak_rss_mb(before_pid)
    Path("/tmp/serving_peak_rss.txt").write_text(f"replica peak RSS (VmHWM) after {len(statuses)} hostile "
                                                 f"requests: {peak:.0f} MiB\n")
    assert peak < 2500, peak


def test_property_based_requests_from_the_openapi_schema(stack):
    """Schema-valid and schema-violating requests for every operation: never a 5xx, every
    error in the error model, every answer as documented. (Not checked: that schema-valid
    data is accepted — any bytes are a valid "binary" body, most are not images.)"""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    seen: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, examples in ((schemathesis.GenerationMode.POSITIVE, 80),
                               (schemathesis.GenerationMode.NEGATIVE, 40)):
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=stack.url, timeout=60)
                seen.append(response.status_code)
                assert response.status_code < 500, (case.path, response.status_code, response.text[:300])
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"code", "message"}
                case.validate_response(response, excluded_checks=[positive_data_acceptance])

            try:
                check()
            except Unsatisfiable:  # nothing to violate: a GET without parameters
                assert mode == schemathesis.GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    assert len(seen) >= 100
    assert requests.get(f"{stack.url}/healthz", timeout=10).status_code == 200


# ---- isolation, metrics, swap, parity ------------------------------------------------------

def test_a_bad_item_does_not_fail_its_batch(stack):
    good = [encode(scene(seed=s)) for s in range(6)]
    bad = [encode(Image.new("RGB", (9000, 4))), encode(scene())[:300], b"nope"]
    payloads = [(g, 200) for g in good] + [(b, None) for b in bad]
    payloads = [payloads[i] for i in (0, 6, 1, 7, 2, 8, 3, 4, 5)]  # interleaved, sent at once
    with ThreadPoolExecutor(len(payloads)) as pool:
        out = list(pool.map(lambda p: post(stack, data=p[0]).status_code, payloads))
    for (_, want), got in zip(payloads, out):
        assert got == want if want else 400 <= got < 500, out


def test_metrics_are_scraped_from_rays_endpoint(stack):
    post(stack, data=encode(scene()))
    post(stack, data=b"")
    wanted = ["ray_fewshot_requests_total", "ray_fewshot_errors_total", "ray_fewshot_request_latency_ms_bucket",
              "ray_fewshot_boxes_per_image_bucket", "ray_fewshot_refinement_total", "ray_fewshot_model_swaps_total",
              "ray_fewshot_batch_size_bucket"]
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        text = requests.get(stack.metrics_url, timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_fewshot_")]
    Path("/tmp/serving_metrics_scrape.txt").write_text("\n".join(lines) + "\n")
    ok = [ln for ln in lines if ln.startswith("ray_fewshot_requests_total") and 'route="/v1/detect"' in ln
          and 'code="200"' in ln and f'model_version="{stack.version}"' in ln]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1
    assert any('error="empty_body"' in ln and 'code="400"' in ln for ln in lines)
    assert any(ln.startswith("ray_fewshot_refinement_total") and 'applied="true"' in ln for ln in lines)


def test_pyfunc_gives_the_same_answer_as_serve(stack):
    import mlflow.pyfunc
    import pandas as pd
    import torch

    mlflow.set_tracking_uri(stack.mlflow_uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{stack.version}")
    assert model.metadata.get_params_schema() is not None
    images = [encode(scene(seed=s)) for s in range(3)] + [encode(scene(900, 700, seed=9), "JPEG")]
    for refine in (True, False):
        for threshold in (0.0, 0.45):
            served = [post(stack, data=img, params={"refine": str(refine).lower(),
                                                    "score_threshold": threshold}).json() for img in images]
            # one image per call, as Serve answered them (a batch pads images to one size,
            # which moves a torchvision detector's border features by float noise), on one
            # thread as the 1-CPU replica runs (Ray sets OMP_NUM_THREADS=1): CPU kernels sum
            # in another order on 2 threads, and an untrained detector's near-tied scores
            # then trade places in the top 50
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                local = [model.predict(pd.DataFrame({"image": [img]}),
                                       params={"score_threshold": threshold, "refine": refine})[0]
                         for img in images]
            finally:
                torch.set_num_threads(threads)
            if [s["detections"] for s in served] != local:
                import json
                Path("/tmp/serving_parity_diff.json").write_text(json.dumps(
                    {"served": [s["detections"] for s in served], "local": local, "refine": refine,
                     "threshold": threshold}))
            assert [s["detections"] for s in served] == local
            assert all(s["refinement"]["applied"] is refine for s in served)
    assert any(len(d) for d in local)


def test_a_new_champion_is_swapped_in_without_failed_requests(stack, tmp_path):
    from fewshot.backends import registry

    v2 = register(stack.mlflow_uri, make_checkpoint(tmp_path / "detector.pt", None, seed=1), alias=False)
    img = encode(scene())
    statuses, versions, stop = [], set(), threading.Event()

    def traffic():
        while not stop.is_set():
            r = post(stack, data=img)
            statuses.append(r.status_code)
            if r.ok:
                versions.add(r.json()["model"]["version"])

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        registry.set_alias(stack.mlflow_uri, MODEL, registry.CHAMPION, v2.version)
        deadline = time.time() + 90
        while time.time() < deadline and v2.version not in versions:
            time.sleep(0.5)
    finally:
        stop.set()
        sender.join(timeout=60)
    assert statuses and set(statuses) == {200}, set(statuses)
    assert v2.version in versions
    body = post(stack, data=img).json()
    assert body["model"]["version"] == v2.version
    assert body["refinement"] == {"applied": False, "reason": "this model version has no CLIP refiner"}
    registry.set_alias(stack.mlflow_uri, MODEL, registry.CHAMPION, stack.version)
    deadline = time.time() + 90
    while time.time() < deadline and post(stack, data=img).json()["model"]["version"] != stack.version:
        time.sleep(0.5)
    assert post(stack, data=img).json()["model"]["version"] == stack.version
