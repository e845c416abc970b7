"""The catalog on object storage: a real S3 server (moto, its own process), real clients
(pyarrow's S3FileSystem in the catalog, boto3 to look at the bucket from outside)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalog import Catalog, DatasetNotFound
from catalog.class_sets import (ClassSetNotFound, extend, list_class_sets, load_class_set,
                                make_class_set, save_class_set)
from catalog.teacher_cache import (build_teacher_cache, has_teacher_cache, list_teacher_caches,
                                   load_teacher_cache)
from catalog.world import build_world
from services import ROOT

COCO_MINI = ROOT.parent / "shared" / "datasets" / "coco-mini"
SIZES = dict(n_train=12, n_val=4, n_test=4, image_size=64, seed=3, workers=1, progress=False)


def _ids(table) -> list[int]:
    return table.column("image_id").to_pylist()


@pytest.fixture(scope="module")
def local_world(tmp_path_factory) -> Catalog:
    """The same small world on local disk, to compare with what comes back from S3."""
    cat = Catalog(tmp_path_factory.mktemp("local"))
    build_world(cat, "w", **SIZES)
    return cat


def test_world_builds_into_s3_and_reads_back(s3, local_world):
    cat = Catalog(s3.uri("cat-world"))  # endpoint and keys from the AWS variables only
    assert not cat.local and cat.list_datasets() == []
    manifest = build_world(cat, "w", **SIZES)
    assert manifest.splits == {"train": 12, "val": 4, "test": 4}
    assert cat.list_datasets() == ["w"] and cat.has_dataset("w")
    assert cat.manifest("w").class_splits == local_world.manifest("w").class_splits

    # what is in the bucket, seen by another client: a manifest naming one generation
    keys = s3.keys("cat-world/")
    raw = json.loads(s3.client().get_object(Bucket=s3.bucket,
                                            Key="cat-world/datasets/w/dataset.json")["Body"].read())
    gen = raw["storage"]["generation"]
    for split in ("train", "val", "test"):
        assert f"cat-world/datasets/w/{gen}/{split}.parquet" in keys
    assert not [k for k in keys if "staging" in k or ".tmp-" in k]

    for split in ("train", "val", "test"):
        remote, local = cat.read_split("w", split), local_world.read_split("w", split)
        assert remote.schema == local.schema
        assert remote.equals(local)  # byte-identical data, images included
    assert cat.split_path("w", "val") == s3.uri("cat-world", "datasets", "w", gen, "val.parquet")
    with pytest.raises(FileNotFoundError):
        cat.read_split("w", "nope")
    with pytest.raises(DatasetNotFound):
        cat.manifest("missing")

    # the same parameters again: reused as is (no new generation)
    build_world(cat, "w", **SIZES)
    assert json.loads(s3.client().get_object(
        Bucket=s3.bucket, Key="cat-world/datasets/w/dataset.json")["Body"].read()) == raw


def test_explicit_endpoint_option_without_endpoint_variable(s3, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    cat = Catalog(s3.uri("cat-explicit"), endpoint_url=s3.endpoint)
    cs = make_class_set("ds", ["a", "b"])
    save_class_set(cat, cs)
    assert s3.keys("cat-explicit/") == [f"cat-explicit/class_sets/{cs.id}.json"]


def test_class_sets_round_trip_on_s3(s3):
    cat = Catalog(s3.uri("cat-cs"))
    assert list_class_sets(cat) == []
    base = make_class_set("world", ["circle", "square"])
    child = extend(base, ["star"])
    other = make_class_set("other", ["x"])
    for cs in (base, child, other):
        where = save_class_set(cat, cs)
        assert where == s3.uri("cat-cs", "class_sets", f"{cs.id}.json")
    assert load_class_set(cat, child.id) == child
    assert load_class_set(cat, child.id).parent == base.id
    assert list_class_sets(cat) == sorted([base, child, other], key=lambda c: c.id)
    assert list_class_sets(cat, dataset="world") == sorted([base, child], key=lambda c: c.id)
    # saving the same list through another parent keeps the first lineage
    save_class_set(cat, make_class_set("world", ["circle", "square", "star"], parent=None))
    assert load_class_set(cat, child.id).parent == base.id
    # a fresh Catalog object (another process, another node) sees the same sets
    assert Catalog(s3.uri("cat-cs")).storage is not cat.storage
    assert load_class_set(Catalog(s3.uri("cat-cs")), base.id) == base
    with pytest.raises(ClassSetNotFound):
        load_class_set(cat, "cs-0000000000")
    assert not [k for k in s3.keys("cat-cs/") if ".tmp-" in k]


def test_failed_write_leaves_the_previous_dataset(s3, local_world):
    cat = Catalog(s3.uri("cat-fail"))
    build_world(cat, "w", **SIZES)
    before = {s: cat.read_split("w", s) for s in ("train", "val", "test")}
    keys_before = s3.keys("cat-fail/")
    manifest = cat.manifest("w")
    rows = local_world.read_split("w", "train").to_pylist()
    with pytest.raises(RuntimeError, match="source died"):
        with cat.writer(manifest, overwrite=True) as w:
            w.write_rows("train", rows)
            w.write_table("val", local_world.read_split("w", "val"))
            raise RuntimeError("source died")
    assert s3.keys("cat-fail/") == keys_before  # the half-written generation is gone
    for s, t in before.items():
        assert cat.read_split("w", s).equals(t)
    with pytest.raises(FileExistsError):  # no overwrite: refused before anything is written
        with cat.writer(manifest) as w:
            pass


KILLED_WRITER = r"""
import sys, time
import numpy as np
from catalog import Catalog
from catalog.store import DatasetWriter
cat = Catalog(sys.argv[1])
manifest = cat.manifest("w")
row = cat.read_split("w", "train").slice(0, 1).to_pylist()[0]
rng = np.random.default_rng(0)
with DatasetWriter(cat, manifest, overwrite=True, row_group_size=2) as w:
    for i in range(10 ** 6):  # 1 MiB incompressible images until killed
        w.write_row("train", dict(row, image_id=100000 + i, image=rng.bytes(1 << 20)))
        if i == 2:
            print("writing", flush=True)
        time.sleep(0.02)
"""


def test_writer_killed_midway_leaves_the_previous_dataset(s3, tmp_path):
    """A writer process SIGKILLed while its Parquet is streaming into S3 (multipart uploads
    in flight): readers still get the old dataset, whole; the next write succeeds."""
    cat = Catalog(s3.uri("cat-kill"))
    build_world(cat, "w", **SIZES)
    before = {s: cat.read_split("w", s) for s in ("train", "val", "test")}
    old_dir = cat.dataset_dir("w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    log = tmp_path / "writer.log"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, cat.uri], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    client = s3.client()
    try:
        deadline = time.time() + 120
        uploads = []
        while time.time() < deadline and not uploads:
            assert proc.poll() is None, log.read_text()
            uploads = [u["Key"] for u in client.list_multipart_uploads(Bucket=s3.bucket)
                       .get("Uploads", []) if u["Key"].startswith("cat-kill/datasets/w/g-")]
            time.sleep(0.2)
        assert uploads, f"the writer never started uploading\n{log.read_text()}"
        # mid-write, readers see the old dataset
        assert cat.dataset_dir("w") == old_dir
        assert cat.read_split("w", "val").equals(before["val"])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert cat.list_datasets() == ["w"]
    assert cat.dataset_dir("w") == old_dir
    assert cat.manifest("w").splits == {"train": 12, "val": 4, "test": 4}
    for s, t in before.items():
        assert cat.read_split("w", s).equals(t)
    # nothing of the dead write is visible as data: only the old generation has files
    data = [k for k in s3.keys("cat-kill/datasets/w/") if k.endswith(".parquet")]
    assert data and all(k.startswith(f"{old_dir.removeprefix(f's3://{s3.bucket}/')}/") for k in data)
    # and the next writer publishes fine
    build_world(cat, "w", **dict(SIZES, n_val=5), overwrite=True)
    assert cat.manifest("w").splits["val"] == 5 and cat.read_split("w", "val").num_rows == 5


def test_overwrites_keep_one_previous_generation_and_collect_the_rest(s3, local_world):
    cat = Catalog(s3.uri("cat-gc"))
    # a generation left behind by a writer that died before its manifest (older than all)
    orphan = "cat-gc/datasets/w/g-20000101T000000000000Z-deadbeef/train.parquet"
    s3.client().put_object(Bucket=s3.bucket, Key=orphan, Body=b"half a parquet")
    gens = []
    for n_val in (4, 5, 6):
        build_world(cat, "w", **dict(SIZES, n_val=n_val), overwrite=True)
        gens.append(str(cat.dataset_dir("w")).rsplit("/", 1)[1])
        assert cat.read_split("w", "val").num_rows == n_val
    present = {k.split("/")[3] for k in s3.keys("cat-gc/datasets/w/") if "/g-" in k}
    assert present == set(gens[-2:])  # current + previous; the first and the orphan are gone


def test_a_local_catalog_synced_to_s3_reads_as_is_and_upgrades_on_write(s3, local_world):
    """``aws s3 sync <local catalog> s3://...`` is a migration path: the flat local layout
    reads from S3; the first write publishes a generation and the flat files go one write
    later (a reader of the old manifest can still finish)."""
    client = s3.client()
    root = local_world.root
    for f in sorted(root.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), s3.bucket, f"cat-sync/{f.relative_to(root).as_posix()}")
    cat = Catalog(s3.uri("cat-sync"))
    assert cat.list_datasets() == ["w"]
    assert cat.dataset_dir("w") == s3.uri("cat-sync", "datasets", "w")
    for split in ("train", "val", "test"):
        assert cat.read_split("w", split).equals(local_world.read_split("w", split))
    flat = {f"cat-sync/datasets/w/{s}.parquet" for s in ("train", "val", "test")}
    build_world(cat, "w", **dict(SIZES, n_val=5), overwrite=True)
    assert cat.read_split("w", "val").num_rows == 5
    assert flat <= set(s3.keys("cat-sync/"))  # the previous data, kept one more write
    build_world(cat, "w", **dict(SIZES, n_val=6), overwrite=True)
    assert not flat & set(s3.keys("cat-sync/"))
    assert cat.read_split("w", "val").num_rows == 6


def test_teacher_cache_on_s3(s3):
    cat = Catalog(s3.uri("cat-teacher"))
    build_world(cat, "w", **SIZES)

    def embed(image, boxes):
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        return np.concatenate([b, np.ones((len(b), 1), np.float32)], axis=1)

    where = build_teacher_cache(cat, "w", "val", embed, teacher_id="box-v1", images_per_batch=2)
    assert where == f"{cat.dataset_dir('w')}/teacher/box-v1/val.parquet"
    assert has_teacher_cache(cat, "w", "val", "box-v1")
    assert list_teacher_caches(cat, "w") == {"box-v1": ["val"]}
    cache = load_teacher_cache(cat, "w", "val", "box-v1")
    val = cat.read_split("w", "val")
    for r in val.to_pylist():
        assert np.allclose(cache[r["image_id"]][:, :4], np.asarray(r["boxes"], np.float32).reshape(-1, 4))
    assert not [k for k in s3.keys("cat-teacher/") if ".tmp-" in k]
    # regenerating the dataset publishes a new generation: the stale cache is not seen
    build_world(cat, "w", **dict(SIZES, seed=4), overwrite=True)
    assert not has_teacher_cache(cat, "w", "val", "box-v1")


def test_embedded_teacher_by_s3_uri_loads_anywhere(s3, tiny_teacher_spec):
    """A teacher written to the bucket loads from its URI (what a node of a cluster does) with
    the same id and the same embeddings as from the local file; the spec it records is the URI."""
    import torch

    from fewshot.clip.teacher import load_teacher, save_embedded_teacher

    local = load_teacher(tiny_teacher_spec, device="cpu")
    uri = s3.uri("teachers", "embedded-teacher.pt")
    assert save_embedded_teacher(uri, local.model, model_name=local.model_name) == uri
    assert "teachers/embedded-teacher.pt" in s3.keys("teachers/")
    remote = load_teacher(f"embedded:{uri}", device="cpu")
    assert remote.id == local.id and remote.spec == f"embedded:{uri}"
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    boxes = [[2, 2, 40, 40], [10, 5, 60, 30]]
    assert torch.allclose(remote.embed_boxes(image, boxes), local.embed_boxes(image, boxes), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="cannot be read"):
        load_teacher(f"embedded:{s3.uri('teachers', 'missing.pt')}", device="cpu")


def test_coco_import_into_s3_and_add_a_split(s3, tmp_path):
    from catalog.importers import import_coco

    if not (COCO_MINI / "annotations" / "instances_val2017.json").is_file():
        pytest.skip("coco-mini not found beside the repo")
    cat = Catalog(s3.uri("cat-coco"))
    ann = COCO_MINI / "annotations"
    # no hold-outs here: this checks that a split is carried over from S3 as stored
    import_coco(cat, "coco", ann / "instances_val2017.json", images=COCO_MINI / "val2017", split="val",
                test_fraction=0.0, val_fraction=0.0)
    val = cat.read_split("coco", "val")
    import_coco(cat, "coco", ann / "instances_train2017.json", images=COCO_MINI / "train2017",
                split="train", test_fraction=0.0, val_fraction=0.0)  # rewrites, carrying val over from S3
    assert set(cat.manifest("coco").splits) == {"train", "val"}
    assert cat.read_split("coco", "val").equals(val)
    n = len(json.loads((ann / "instances_train2017.json").read_text())["images"])
    assert cat.read_split("coco", "train").num_rows == n
    # export back out to S3 as COCO json
    from catalog.coco_export import export_coco

    out = export_coco(cat, "coco", "val", s3.uri("exports", "val.json"))
    assert out == s3.uri("exports", "val.json")
    body = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="exports/val.json")["Body"].read())
    assert len(body["images"]) == val.num_rows


@pytest.fixture(scope="module")
def ray_with_aws_env(s3_service):
    """A local Ray cluster whose processes have the AWS variables, as every node of a real
    cluster does (pod env, instance role): the filesystem the catalog hands to Ray carries
    the endpoint and region, never the credentials."""
    import ray

    saved = {k: os.environ.get(k) for k in s3_service.env}
    os.environ.update(s3_service.env)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.integration
def test_ray_data_reads_a_split_from_the_s3_uri(s3, local_world, ray_with_aws_env):
    """Ray Data on a local Ray cluster reads the split from its s3:// URI in worker
    processes, with the (uri, filesystem) pair the catalog hands out."""
    import ray

    cat = Catalog(s3.uri("cat-ray"))
    build_world(cat, "w", **SIZES)
    src = cat.split_source("w", "train")
    uri, fs = src
    assert uri.startswith(f"s3://{s3.bucket}/cat-ray/datasets/w/g-") and uri.endswith("/train.parquet")
    ds = ray.data.read_parquet(uri, filesystem=fs)
    if True:

        rows = ds.map_batches(lambda b: {"image_id": b["image_id"], "n_boxes":
                                         np.asarray([len(x) for x in b["boxes"]]),
                                         "pid": np.full(len(b["image_id"]), os.getpid())},
                              batch_format="numpy").take_all()
        assert os.getpid() not in {r["pid"] for r in rows}  # read in Ray workers
        local = local_world.read_split("w", "train")
        assert sorted(r["image_id"] for r in rows) == sorted(_ids(local))
        want = {i: len(b) for i, b in zip(_ids(local), local.column("boxes").to_pylist())}
        assert {r["image_id"]: r["n_boxes"] for r in rows} == want
    # and pyarrow alone, with the same pair
    assert pq.read_table(src.path, filesystem=fs).num_rows == 12


@pytest.mark.integration
def test_ray_train_checkpoints_into_s3_storage(s3, ray_with_aws_env):
    """Ray Train's storage on the object store: RunConfig(storage_path, storage_filesystem)
    from catalog.storage.resolve_uri; checkpoints land in the bucket and read back."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from catalog.storage import resolve_uri

    def train_loop(config):  # defined here: pickled by value to the workers
        import tempfile

        import ray.train
        from ray.train import Checkpoint

        start = ray.train.get_checkpoint()
        assert start is None
        for step in (1, 2):
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "state.json"), "w") as f:
                    json.dump({"step": step, "pid": os.getpid()}, f)
                ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d))

    fs, path = resolve_uri(s3.uri("ray-results"))
    assert path == f"{s3.bucket}/ray-results"
    trainer = TorchTrainer(
        train_loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="s3-run", storage_path=path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    result = trainer.fit()
    assert result.error is None
    assert result.checkpoint.path.startswith(f"{s3.bucket}/ray-results/s3-run/")
    keys = s3.keys("ray-results/s3-run/")
    states = [k for k in keys if k.endswith("/state.json")]
    assert len(states) == 1  # num_to_keep=1: the first checkpoint was deleted from S3
    with result.checkpoint.as_directory() as d:
        state = json.load(open(os.path.join(d, "state.json")))
    assert state["step"] == 2 and state["pid"] != os.getpid()


@pytest.mark.integration
def test_mlflow_artifacts_on_the_same_object_storage(s3_service, tmp_path, monkeypatch):
    """The MLflow recipe's layout: the server proxies artifacts into the S3 bucket (boto3
    reading AWS_ENDPOINT_URL); the client needs no S3 access at all."""
    import mlflow

    from services import mlflow_server

    from mlflow.tracking._tracking_service import utils as tracking_utils

    for k in s3_service.env:  # the client has no AWS settings: everything goes via the server
        monkeypatch.delenv(k, raising=False)
    # set_tracking_uri exports MLFLOW_TRACKING_URI: restore it (and mlflow's global) after,
    # so later tests and their subprocesses do not call this test's stopped server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # recorded: restored (or removed) after
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    with mlflow_server(tmp_path / "mlflow", artifacts=s3_service.uri("mlflow"),
                       env=s3_service.env) as uri:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("s3-artifacts")
        (tmp_path / "weights.txt").write_text("detector weights")
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(tmp_path / "weights.txt"), artifact_path="model")
        keys = s3_service.keys("mlflow/")
        assert [k for k in keys if k.endswith(f"/{run.info.run_id}/artifacts/model/weights.txt")]
        back = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                   artifact_path="model/weights.txt",
                                                   dst_path=str(tmp_path / "back"))
        assert open(back).read() == "detector weights"
