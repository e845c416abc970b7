"""Pretrain the embedded CLIP teacher on the captioned synthetic corpus and register it.

    python jobs/pretrain_teacher.py --steps 3000 --threads 1 --out ~/.cache/fewshot/teachers/embedded-teacher.pt
    ray job submit --working-dir . -- python jobs/pretrain_teacher.py --mlflow-uri http://HOST:5000

Trains the small OpenCLIP model contrastively (fewshot.clip.pretraining), reports its
zero-shot top-1 accuracy on ground-truth crops of the detection world's test split (all
classes, and the novel classes of each base/novel split), saves the checkpoint, and, with an
MLflow server, logs the run and registers the checkpoint as a version of its own registered
model (default ``fewshot-clip-teacher``, tag ``teacher_spec``, alias ``champion``).
The teacher is then used by its spec: ``embedded:<path of --out>``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from catalog.storage import is_uri

DEFAULT_REGISTERED_NAME = "fewshot-clip-teacher"
ARTIFACT_PATH = "teacher"
CHAMPION = "champion"


def build_parser() -> argparse.ArgumentParser:
    from catalog.store import DEFAULT_ROOT_ENV, default_root
    from fewshot.clip.teacher import TEACHER_DIR_ENV, default_teacher_path

    p = argparse.ArgumentParser(
        prog="pretrain_teacher",
        description="Train the embedded OpenCLIP teacher (a small ResNet image tower and "
                    "transformer text tower, created through open_clip's model-config registry) with the CLIP "
                    "contrastive loss on captioned crops and scenes of the synthetic world, "
                    "report zero-shot top-1 on the world's test crops (all classes and the "
                    "novel classes of split1..3), save the checkpoint and register it in MLflow.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--catalog", default=str(default_root()),
                   help=f"catalog root folder holding the evaluation dataset (${DEFAULT_ROOT_ENV})")
    p.add_argument("--dataset", default="synthworld",
                   help="dataset whose test split gives the zero-shot evaluation crops; if it is "
                        "not in the catalog, the synthetic world's test split is rendered in "
                        "memory instead (same generator and seed as build_dataset.py)")
    p.add_argument("--eval-split", default="test", choices=["train", "val", "test"],
                   help="split of --dataset to evaluate zero-shot classification on")
    p.add_argument("--eval-images", type=int, default=300,
                   help="evaluate on the crops of at most this many images of the split")
    p.add_argument("--out", default=str(default_teacher_path()),
                   help=f"where to write the teacher checkpoint: a path (${TEACHER_DIR_ENV} sets the "
                        "default folder) or a URI such as s3://bucket/teachers/embedded-teacher.pt, "
                        "which every node of a cluster can read; use it as teacher spec "
                        "'embedded:<path or URI>'")
    p.add_argument("--steps", type=int, default=3000,
                   help="contrastive training steps (measured on a busy 2-core CPU, 1 thread, "
                        "batch 64: 1000 steps 5.5 min -> zero-shot top-1 0.26 over 20 classes; "
                        "3000 steps 15 min -> 0.54)")
    p.add_argument("--batch-size", type=int, default=64, help="image-caption pairs per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate "
                   "(linear warm-up over 5%% of the steps, then cosine decay)")
    p.add_argument("--corpus-pairs", type=int, default=8000,
                   help="captioned pairs rendered for training (object crops + scene pairs)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the corpus, the initialisation and the batch order")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for training (None: torch decides; on a busy "
                        "machine 1 can be much faster than an oversubscribed 2+)")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking server ($MLFLOW_TRACKING_URI); without one the run is "
                        "not logged or registered and only the checkpoint file is written")
    p.add_argument("--experiment", default="fewshot-teacher", help="MLflow experiment name")
    p.add_argument("--model-name", default=DEFAULT_REGISTERED_NAME,
                   help="registered model name of the teacher in the MLflow registry")
    p.add_argument("--no-progress", action="store_true", help="print no training progress")
    return p


# ---- evaluation crops ----------------------------------------------------------------------

def evaluation_rows(catalog_root: str, dataset: str, split: str, n_images: int):
    """(rows, manifest): catalog rows of the split, or the world's split rendered in memory."""
    from catalog.store import Catalog
    from catalog.world import iter_split, world_manifest

    catalog = Catalog(catalog_root)
    if catalog.has_dataset(dataset):
        manifest = catalog.manifest(dataset)
        table = catalog.read_split(dataset, split)
        if table.num_rows > n_images:
            table = table.slice(0, n_images)
        return table.to_pylist(), manifest, f"{dataset}/{split} in {catalog.root}"
    manifest = world_manifest()
    rows = list(iter_split(split, n_images, seed=0))
    return rows, manifest, f"synthetic world {split} split rendered in memory (seed 0)"


def evaluation_crops(teacher, rows, manifest):
    """Ground-truth crops (as the teacher crops boxes) and their class names."""
    names = {c.id: c.name for c in manifest.categories}
    crops, labels = [], []
    for row in rows:
        keep = [(b, c) for b, c, crowd in zip(row["boxes"], row["category_ids"],
                                              row.get("iscrowd") or [False] * len(row["boxes"]))
                if not crowd]
        if not keep:
            continue
        crops += teacher.box_crops(row["image"], [b for b, _ in keep])
        labels += [names[int(c)] for _, c in keep]
    return crops, labels


def zero_shot_figures(teacher, rows, manifest) -> dict[str, float]:
    from fewshot.clip.pretraining import zero_shot_report

    crops, labels = evaluation_crops(teacher, rows, manifest)
    class_names = [c.name for c in manifest.categories]
    subsets = {f"novel_{cs.name}": list(cs.novel) for cs in manifest.class_splits}
    report = zero_shot_report(teacher, crops, labels, class_names, subsets=subsets)
    out = {"zs_top1_all": report["all"], "zs_crops": report["count_all"]}
    for cs in manifest.class_splits:
        key = f"novel_{cs.name}"
        out[f"zs_top1_{cs.name}_novel"] = report[key]          # among the split's novel classes
        out[f"zs_top1_{cs.name}_novel_gzsl"] = report[f"{key}_gzsl"]  # among all classes
        out[f"zs_crops_{cs.name}_novel"] = report[f"count_{key}"]
    return out


# ---- MLflow --------------------------------------------------------------------------------

def register_teacher(uri: str, experiment: str, model_name: str, path: Path, spec: str,
                     teacher_id: str, params: dict, metrics: dict, losses: list[float]) -> str:
    """Log the run and register the checkpoint as a new version; returns the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with mlflow.start_run(run_name=f"teacher-{teacher_id}") as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        finite = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(float(v))}
        mlflow.log_metrics(finite)
        from mlflow.entities import Metric

        every = max(1, len(losses) // 200)
        now = int(time.time() * 1000)
        curve = [Metric("train_loss", float(losses[s]), now, s) for s in range(0, len(losses), every)]
        client.log_batch(run.info.run_id, metrics=curve)
        mlflow.log_artifact(str(path), artifact_path=ARTIFACT_PATH)
        mlflow.log_dict({"teacher_spec": spec, "teacher_id": teacher_id, **finite},
                        f"{ARTIFACT_PATH}/teacher.json")
        source = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
        try:
            client.get_registered_model(model_name)
        except Exception:  # noqa: BLE001 - not there yet
            client.create_registered_model(
                model_name, description="CLIP teacher for distillation and refinement; load "
                                        "with fewshot.clip.teacher.load_teacher(tag teacher_spec)")
        tags = {"teacher_spec": spec, "teacher_id": teacher_id, "checkpoint": path.name,
                **{k: f"{v:.4f}" for k, v in finite.items() if k.startswith("zs_top1")}}
        mv = client.create_model_version(model_name, source=source, run_id=run.info.run_id,
                                         tags=tags)
        client.set_registered_model_alias(model_name, CHAMPION, mv.version)
    return str(mv.version)


def download_registered_teacher(uri: str, model_name: str = DEFAULT_REGISTERED_NAME,
                                alias: str = CHAMPION, dst: str | None = None) -> str:
    """Fetch the registered teacher behind ``alias``; return a spec that loads it here."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias(model_name, alias)
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source,
                                                dst_path=dst or tempfile.mkdtemp())
    return f"embedded:{Path(local) / mv.tags.get('checkpoint', 'embedded-teacher.pt')}"


# ---- main ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 2 or args.corpus_pairs < args.batch_size:
        print("error: need --steps >= 1, --batch-size >= 2 and --corpus-pairs >= --batch-size",
              file=sys.stderr)
        return 2

    from fewshot.clip.teacher import save_embedded_teacher
    from fewshot.clip.pretraining import train_embedded_teacher

    def report(step: int, logs: dict) -> None:
        print(f"step {step:5d}  loss {logs['loss']:.3f}  batch i2t acc {logs['batch_i2t_acc']:.2f}"
              f"  lr {logs['lr']:.2e}  logit scale {logs['logit_scale']:.1f}", flush=True)

    t0 = time.perf_counter()
    teacher, metrics = train_embedded_teacher(
        steps=args.steps, batch_size=args.batch_size, seed=args.seed,
        progress=False if args.no_progress else report, lr=args.lr,
        corpus_pairs=args.corpus_pairs, threads=args.threads,
        log_every=max(1, args.steps // 12),
    )
    print(f"trained in {metrics['train_seconds']:.0f} s (+ {metrics['corpus_seconds']:.0f} s "
          f"rendering {metrics['corpus_pairs']} pairs); loss {metrics['loss_start']:.3f} -> "
          f"{metrics['loss_end']:.3f}", flush=True)

    rows, manifest, where = evaluation_rows(args.catalog, args.dataset, args.eval_split,
                                            args.eval_images)
    zs = zero_shot_figures(teacher, rows, manifest)
    metrics.update(zs)
    remote = is_uri(args.out) and not args.out.startswith("file://")
    out = args.out if remote else Path(args.out.removeprefix("file://")).expanduser().resolve()
    info = {k: v for k, v in metrics.items() if k != "losses"}
    info.update({"seed": args.seed, "lr": args.lr, "eval": where})
    save_embedded_teacher(out, teacher.model, model_name=teacher.model_name, info=info)
    local = out
    if remote and args.mlflow_uri:  # MLflow logs a local file: the same bytes again, in a temp dir
        local = Path(tempfile.mkdtemp()) / Path(args.out).name
        save_embedded_teacher(local, teacher.model, model_name=teacher.model_name, info=info)
    spec = f"embedded:{out}"
    total = time.perf_counter() - t0

    print(f"zero-shot top-1 on {int(zs['zs_crops'])} ground-truth crops of {where}:")
    print(f"  all {len(manifest.categories)} classes: {zs['zs_top1_all']:.3f}")
    for cs in manifest.class_splits:
        print(f"  {cs.name} novel ({', '.join(cs.novel)}; {int(zs[f'zs_crops_{cs.name}_novel'])} "
              f"crops): {zs[f'zs_top1_{cs.name}_novel']:.3f} among the novel classes, "
              f"{zs[f'zs_top1_{cs.name}_novel_gzsl']:.3f} among all classes")
    print(f"teacher {teacher.id} saved to {out} ({total:.0f} s in all)")
    print(f"teacher spec: {spec}")

    if args.mlflow_uri:
        params = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                  "corpus_pairs": args.corpus_pairs, "seed": args.seed,
                  "model_cfg": json.dumps(_model_cfg(teacher)),
                  "eval": where}
        version = register_teacher(args.mlflow_uri, args.experiment, args.model_name, local, spec,
                                   teacher.id, params, {k: v for k, v in metrics.items()
                                                        if k != "losses"}, metrics["losses"])
        print(f"registered models:/{args.model_name}/{version} (alias {CHAMPION})")
    else:
        print("no MLflow server given (--mlflow-uri / $MLFLOW_TRACKING_URI): not registered")
    return 0


def _model_cfg(teacher) -> dict:
    import open_clip

    return open_clip.get_model_config(teacher.model_name) or {}


if __name__ == "__main__":
    sys.exit(main())
