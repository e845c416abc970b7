"""Wall time of add_classes (5 classes x 10 shots), split into its stages: load/validate, expand,
fine-tune, refine-fit, evaluate, register. Goals: <= 3 min on a 2-core CPU, <= 60 s on one GPU.

    python benchmarks/add_classes_wall.py                     # CPU, add_classes' defaults (150 steps)
    python benchmarks/add_classes_wall.py --gpu               # the fine-tune and evaluation on a GPU
    python benchmarks/add_classes_wall.py --steps 50 --repeats 5 --max-test-images 100   # shorter

Everything it needs is started here on 127.0.0.1 and stopped at the end: an MLflow server
(sqlite + local artifacts, ``tests/services.py``), a local Ray cluster, an embedded-world catalog
in a temp dir and a small base model (``--base-steps`` steps of ``--preset``, registered as
``champion``). Each repeat adds split1's 5 novel classes to its own copy of that champion
(registered model ``bench-<i>``) with ``run_add_classes``, which reports its stage times
(``AddClassesResult.timings``, also MLflow metrics ``time/<stage>_s``). The table shows the
median of the repeats per stage.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform as _platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_services():
    """tests/services.py (the MLflow server helper the tests use), imported by path."""
    spec = importlib.util.spec_from_file_location("fewshot_test_services", ROOT / "tests" / "services.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="add_classes runs (the median is reported)")
    p.add_argument("--shots", type=int, default=10, help="K shots per new class")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps (add_classes' default: 150)")
    p.add_argument("--gpu", action="store_true", help="fine-tune and evaluate on a GPU")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    p.add_argument("--preset", default="lite0-fpn",
                   help="detector preset of the base model (lite0-fpn: the demo's; cpu-small: the small one)")
    p.add_argument("--base-steps", type=int, default=40, help="steps of the small base model")
    p.add_argument("--n-train", type=int, default=300, help="train images of the generated world")
    p.add_argument("--n-val", type=int, default=150, help="val images (the gate uses them all)")
    p.add_argument("--n-test", type=int, default=300, help="test images")
    p.add_argument("--max-test-images", type=int, default=None, help="report on at most this many test images")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--teacher", default="untrained",
                   help="CLIP teacher for the refine-fit stage: 'untrained' (an untrained embedded teacher "
                        "made here: the same work as a trained one), 'none', or a teacher spec")
    return p


def base_model(catalog, path: Path, steps: int, preset_name: str) -> Path:
    """``preset_name`` on split1's base classes, trained ``steps`` steps in this process (trained-ish)."""
    from fewshot.learning.loop import TrainConfig
    from fewshot.learning.method import MethodConfig, finetune
    from fewshot.model.checkpoint import DetectorCheckpoint, save_checkpoint
    from fewshot.model.detector import build_detector
    from fewshot.model.presets import preset

    manifest = catalog.manifest("synthworld")
    classes = list(manifest.class_split("split1").base)
    ids = [manifest.category_by_name()[c].id for c in classes]
    cfg = preset(preset_name)
    torch.manual_seed(0)
    start = DetectorCheckpoint(cfg, classes, ids, "synthworld", "cs-bench",
                               build_detector(cfg, len(classes) + 1).state_dict())
    rows = catalog.read_split("synthworld", "train").to_pylist()
    model = finetune(start, rows, TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=5, log_every=10),
                     MethodConfig(freeze="none"), seed=0, device="cpu", precision="fp32")
    return save_checkpoint(path, model, cfg, classes, ids, "synthworld", "cs-bench")


def main(args) -> int:
    import ray

    from catalog import Catalog
    from catalog.world import build_world
    from fewshot.backends import registry
    from fewshot.backends.cluster import ClusterOptions
    from fewshot.learning.loop import TrainConfig
    from fewshot.learning.method import MethodOptions
    from fewshot.workflows.add_classes import STAGES, AddClassesOptions, run_add_classes
    from fewshot.workflows.options import StoreOptions

    services = load_services()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="fewshot-bench-add-"))
    t0 = time.perf_counter()
    catalog = Catalog(work / "catalog")
    build_world(catalog, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=0, progress=False)
    print(f"world built ({time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    base = base_model(catalog, work / "base" / "detector.pt", args.base_steps, args.preset)  # the registry wants this name
    print(f"base model: {args.preset}, {args.base_steps} steps ({time.perf_counter() - t0:.0f} s)", flush=True)
    novel = tuple(catalog.manifest("synthworld").class_split("split1").novel)
    teacher = None if args.teacher == "none" else args.teacher
    if args.teacher == "untrained":
        from fewshot.clip.teacher import create_embedded_model, save_embedded_teacher

        torch.manual_seed(0)
        model, model_name = create_embedded_model()
        teacher = f"embedded:{save_embedded_teacher(work / 'teacher.pt', model, model_name=model_name)}"
    runs = []
    with services.mlflow_server(work / "mlflow") as uri:
        import mlflow

        from fewshot.model.checkpoint import load_checkpoint

        ckpt = load_checkpoint(base)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("bench-base")
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            for i in range(args.repeats):
                name = f"bench-{i}"
                with mlflow.start_run():
                    v = registry.register_detector(uri, name, base, classes=ckpt.classes, class_set=ckpt.class_set,
                                                   parent_version=None, shots=None,
                                                   extra_tags={"dataset": "synthworld"})
                registry.set_alias(uri, name, registry.CHAMPION, v.version)
                opts = AddClassesOptions(
                    classes=novel, shots=args.shots, seed=i,
                    store=StoreOptions(catalog=str(catalog.root), mlflow_uri=uri, model_name=name,
                                       experiment="bench-add-classes"),
                    cluster=ClusterOptions(num_workers=1, cpus_per_worker=args.cpus, gpu=args.gpu,
                                           precision=args.precision),
                    train=TrainConfig(steps=args.steps, batch_size=8, lr=5e-4, warmup_steps=20, log_every=10),
                    method=MethodOptions(teacher=teacher), max_test_images=args.max_test_images)
                t = time.perf_counter()
                try:
                    result = run_add_classes(opts)
                except Exception as err:  # noqa: BLE001 - e.g. Ray's OOM killer on a shared box
                    print(f"repeat {i} FAILED after {time.perf_counter() - t:.0f} s: {err!r:.300}", flush=True)
                    continue
                total = time.perf_counter() - t
                runs.append({**result.timings, "total": total, "precision": result.precision})
                print(f"repeat {i}: {total:.1f} s " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()),
                      flush=True)
        finally:
            ray.shutdown()
    if not runs:
        print("no repeat finished", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name() if args.gpu and torch.cuda.is_available() else \
        f"CPU ({_platform.machine()}, {os.cpu_count()} cores)"
    print(f"\ndevice: {device}; preset {args.preset}; precision {runs[0]['precision']}; torch {torch.__version__}; ray {ray.__version__}; "
          f"teacher {args.teacher}; {len(novel)} classes x {args.shots} shots, {args.steps} fine-tuning steps x batch 8, val {args.n_val} "
          f"images, test {args.max_test_images or args.n_test} images; median of {len(runs)} runs\n")
    print("| stage | median s | min-max s |")
    print("|---|---|---|")
    for stage in (*STAGES, "total"):
        vals = [r.get(stage, 0.0) for r in runs]
        print(f"| {stage} | {statistics.median(vals):.1f} | {min(vals):.1f}-{max(vals):.1f} |")
    goal = 60 if args.gpu else 180
    med = statistics.median(r["total"] for r in runs)
    print(f"\ngoal <= {goal} s: {'met' if med <= goal else 'NOT met'} ({med:.0f} s)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
