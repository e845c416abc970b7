"""Import a COCO json or Pascal VOC folder into the catalog and print a validation report.

    python jobs/import_dataset.py --name coco-mini --split train \\
        --coco ../shared/datasets/coco-mini/annotations/instances_train2017.json \\
        --images ../shared/datasets/coco-mini/train2017
    python jobs/import_dataset.py --name coco-mini --split val \\
        --coco ../shared/datasets/coco-mini/annotations/instances_val2017.json \\
        --images ../shared/datasets/coco-mini/val2017
    python jobs/import_dataset.py --name bccd --voc ../shared/datasets/bccd

Splits never share an image: images are compared across splits by a sha256 of their decoded
pixels (renamed copies and metadata-only edits are caught; lossy re-encodes are not). An
image found in two splits stops the import unless --on-overlap says which split keeps it.
A dataset left without a test split gets a seeded, class-stratified hold-out of train (of
val when there is no train; val stays whole for selection), and one with train but no val
gets a val hold-out; the manifest records what was held out (split_origins).

Exit status: 0 imported; 2 bad input or arguments (one-line error, catalog unchanged);
3 imported, but logging the report to MLflow failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from catalog import Catalog, default_root
from catalog.importers import (
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    OVERLAP_POLICIES,
    import_coco,
    import_voc,
)
from catalog.schema import SPLITS
from catalog.validation import DatasetImportError, ImportReport


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="import_dataset.py",
        description="Import a COCO json or a Pascal VOC folder into the Parquet catalog. "
                    "The input is checked completely; bad input stops the import with a "
                    "one-line error and leaves the catalog unchanged. Repairable quirks "
                    "(boxes outside the image, zero-area boxes, grayscale/CMYK/EXIF-rotated "
                    "images) are fixed and counted in the printed report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--coco", metavar="ANNOTATIONS.json", type=Path,
                     help="COCO detection json (instances_*.json) to import as one split")
    src.add_argument("--voc", metavar="DIR", type=Path,
                     help="Pascal VOC folder (holding Annotations/, JPEGImages/, "
                          "ImageSets/Main/), or a folder holding exactly one such folder")
    p.add_argument("--name", required=True,
                   help="dataset name in the catalog; importing another split under an "
                        "existing name adds it to that dataset (categories must match)")
    p.add_argument("--images", metavar="DIR", type=Path, default=None,
                   help="COCO only: folder the json's file_name entries are relative to "
                        "(default: COCO's layout, annotations/instances_X.json -> X/)")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="split to import into. COCO: default is the split named in the json "
                        "file name (instances_val2017.json -> val). VOC: put every annotated "
                        "image into this one split instead of using ImageSets/Main")
    p.add_argument("--voc-split-map", metavar="SET=SPLIT,...", default=None,
                   help="VOC only: which ImageSets/Main/<SET>.txt goes into which catalog "
                        "split (default train=train,val=val,test=test); images in no listed "
                        "set are skipped and counted")
    p.add_argument("--catalog", type=Path, default=None,
                   help=f"catalog root folder (default: $FEWSHOT_CATALOG if set, else "
                        f"~/.cache/fewshot/catalog; here {default_root()})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the imported split(s) if the dataset already has them "
                        "(its other splits are kept); without it an existing split is an error")
    p.add_argument("--on-overlap", choices=OVERLAP_POLICIES, default="refuse",
                   help="what to do with an image (same decoded pixels, whatever its file "
                        "name) found in more than one split, among the imported splits and "
                        "the dataset's existing ones. refuse (default): stop with an error "
                        "naming some pairs, write nothing. keep-in-train: keep it in the first "
                        "of train, val, test that holds it and remove it from the others. "
                        "keep-in-eval: keep it in the first of test, val, train. The report "
                        "counts the images removed from each split")
    p.add_argument("--test-fraction", type=_fraction, default=DEFAULT_TEST_FRACTION,
                   metavar="F",
                   help="when the dataset has no test split after this import, hold out this "
                        "fraction of train's images as test (of val's when there is no "
                        "train), seeded and stratified by each image's rarest class so every "
                        "class with 2+ images lands on both sides (rare classes can push the "
                        "share above F). A later import of a real test split, or of train, "
                        "returns the held-out images and draws again. 0 turns it off "
                        f"(default {DEFAULT_TEST_FRACTION})")
    p.add_argument("--val-fraction", type=_fraction, default=DEFAULT_VAL_FRACTION,
                   metavar="F",
                   help="when the dataset has train but no val after this import, hold out "
                        "this fraction of train's images as val, after the test draw and "
                        "the same way (importing a real val later returns them to train). "
                        f"0 turns it off (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--holdout-seed", type=int, default=0, metavar="N",
                   help="seed of the test/val hold-out draws; the same images, fractions and "
                        "seed give the same hold-outs on every machine (default 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads decoding images (default: number of CPUs, at most 8)")
    p.add_argument("--report-json", metavar="PATH", type=Path, default=None,
                   help="also write the validation report as JSON to this file")
    p.add_argument("--mlflow-uri", default=None,
                   help="MLflow tracking URI; when given (or MLFLOW_TRACKING_URI is set) the "
                        "report is logged as params, metrics and a JSON artifact in a run "
                        "named import-<name>")
    p.add_argument("--mlflow-experiment", default="dataset-imports",
                   help="MLflow experiment for the import run (default: dataset-imports)")
    p.add_argument("--quiet", action="store_true",
                   help="print only the summary table, not every class")
    return p


def log_to_mlflow(report: ImportReport, uri: str, experiment: str) -> str:
    """Log the report in an MLflow run named ``import-<dataset>``; returns the run id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"import-{report.dataset}") as run:
        mlflow.set_tags({"job": "import_dataset", "dataset": report.dataset})
        mlflow.log_params(report.params())
        mlflow.log_metrics(report.metrics())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "import_report.json"
            path.write_text(json.dumps(report.to_dict(), indent=2))
            mlflow.log_artifact(str(path))
            txt = Path(tmp) / "import_report.txt"
            txt.write_text(report.format_table())
            mlflow.log_artifact(str(txt))
        return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.coco is not None and args.voc_split_map is not None:
        parser.error("--voc-split-map is for --voc imports")
    if args.voc is not None and args.images is not None:
        parser.error("--images is for --coco imports (VOC images are in JPEGImages/)")
    if args.voc is not None and args.split is not None and args.voc_split_map is not None:
        parser.error("give either --split (everything into one split) or --voc-split-map")

    if args.test_fraction + args.val_fraction >= 1.0:
        parser.error("--test-fraction + --val-fraction must be below 1")

    catalog = Catalog(args.catalog)
    split_options = dict(on_overlap=args.on_overlap, test_fraction=args.test_fraction,
                         val_fraction=args.val_fraction, holdout_seed=args.holdout_seed)
    try:
        if args.coco is not None:
            report = import_coco(catalog, args.name, args.coco, images=args.images,
                                 split=args.split, overwrite=args.overwrite,
                                 workers=args.workers, **split_options)
        else:
            report = import_voc(catalog, args.name, args.voc, split=args.split,
                                split_map=args.voc_split_map, overwrite=args.overwrite,
                                workers=args.workers, **split_options)
    except (DatasetImportError, FileExistsError) as exc:
        message = " ".join(str(exc).split())
        print(f"import_dataset: error: {message}", file=sys.stderr)
        return 2

    print(report.format_table(max_classes=20 if args.quiet else None))
    print(f"dataset {args.name!r} is in the catalog at {catalog.dataset_dir(args.name)} "
          f"(splits: {catalog.manifest(args.name).splits})")
    if args.report_json is not None:
        args.report_json.parent.mkdir(parents=True, exist_ok=True)
        args.report_json.write_text(json.dumps(report.to_dict(), indent=2))
        print(f"report written to {args.report_json}")

    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        try:
            run_id = log_to_mlflow(report, uri, args.mlflow_experiment)
        except Exception as exc:  # the data is imported; say so and fail loudly
            print(f"import_dataset: error: dataset imported, but logging to MLflow at {uri} "
                  f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 3
        print(f"report logged to MLflow at {uri} (run import-{args.name}, id {run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
