"""Prove that the lite0-fpn preset's backbone carries real ImageNet features, offline.

1. ImageNet head on crops of real objects (COCO-mini, train + val annotations): top-1/top-5
   agreement between the network's ImageNet prediction and the object's COCO category, for the
   COCO categories that map to a set of ImageNet classes by hand (:data:`COCO_TO_IMAGENET`;
   COCO categories without a meaningful ImageNet counterpart, ``person`` first of all, are left
   out and listed). Compared with the same network under ImageNet mean/std inputs instead of
   [-1, 1], and with randomly initialised copies (chance level of each category's set).
2. Linear probe on BCCD blood-cell crops (RBC / WBC / Platelets; trained on the trainval image
   list, scored on the test image list, so no image is in both): multinomial logistic
   regression on the 1280-d pooled feature of the pretrained network vs a randomly initialised
   copy of the same network. Per seed: a fresh class-balanced training subsample and (for the
   random copy) a fresh initialisation. Accuracy and balanced accuracy, mean ± 95% t-interval.

    python benchmarks/verify_pretrained_backbone.py --threads 1 --seeds 5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewshot.model.efficientnet_lite import EfficientNetLite0, lite0_imagenet
from fewshot.metrics.stats import mean_ci95

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"  # shared/ beside the repo

# COCO category -> ImageNet-1k class names (torchvision's spelling), chosen by hand where the
# ImageNet label names the same kind of object. Ranges: the dog (151-268) and bird classes.
_DOGS = tuple(range(151, 269))
_BIRDS = tuple(range(7, 25)) + tuple(range(80, 101)) + tuple(range(127, 147))
COCO_TO_IMAGENET: dict[str, tuple] = {
    "bicycle": ("mountain bike", "bicycle-built-for-two", "tricycle"),
    "car": ("beach wagon", "cab", "convertible", "jeep", "limousine", "minivan", "Model T", "racer",
            "sports car", "police van", "ambulance", "pickup", "car wheel", "grille"),
    "motorcycle": ("moped", "motor scooter"),
    "airplane": ("airliner", "warplane", "wing", "airship"),
    "bus": ("school bus", "trolleybus", "minibus"),
    "train": ("passenger car", "electric locomotive", "steam locomotive", "freight car", "streetcar",
              "bullet train"),
    "truck": ("trailer truck", "pickup", "fire engine", "garbage truck", "tow truck", "moving van",
              "police van"),
    "boat": ("canoe", "speedboat", "lifeboat", "fireboat", "gondola", "yawl", "catamaran", "trimaran",
             "container ship", "liner", "schooner", "pirate", "paddlewheel", "submarine", "dock"),
    "traffic light": ("traffic light",),
    "stop sign": ("street sign",),
    "parking meter": ("parking meter",),
    "bench": ("park bench",),
    "bird": _BIRDS,
    "cat": ("tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"),
    "dog": _DOGS,
    "horse": ("sorrel",),
    "sheep": ("ram", "bighorn"),
    "cow": ("ox",),
    "elephant": ("Indian elephant", "African elephant", "tusker"),
    "bear": ("brown bear", "American black bear", "ice bear", "sloth bear"),
    "zebra": ("zebra",),
    "backpack": ("backpack",),
    "umbrella": ("umbrella",),
    "handbag": ("purse",),
    "tie": ("Windsor tie", "bow tie"),
    "skis": ("ski",),
    "sports ball": ("soccer ball", "basketball", "tennis ball", "volleyball", "rugby ball", "golf ball",
                    "baseball", "croquet ball", "ping-pong ball"),
    "tennis racket": ("racket",),
    "bottle": ("beer bottle", "wine bottle", "water bottle", "pop bottle", "pill bottle", "whiskey jug",
               "water jug"),
    "wine glass": ("goblet", "red wine", "beer glass"),
    "cup": ("cup", "coffee mug", "espresso", "measuring cup"),
    "spoon": ("wooden spoon",),
    "bowl": ("mixing bowl", "soup bowl"),
    "banana": ("banana",),
    "apple": ("Granny Smith",),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "hot dog": ("hotdog",),
    "pizza": ("pizza",),
    "chair": ("barber chair", "folding chair", "rocking chair", "throne"),
    "couch": ("studio couch",),
    "potted plant": ("pot",),
    "bed": ("four-poster", "quilt", "crib", "cradle"),
    "dining table": ("dining table",),
    "toilet": ("toilet seat",),
    "tv": ("television", "monitor", "screen"),
    "laptop": ("laptop", "notebook"),
    "mouse": ("mouse",),
    "remote": ("remote control",),
    "keyboard": ("computer keyboard", "typewriter keyboard", "space bar"),
    "cell phone": ("cellular telephone",),
    "microwave": ("microwave",),
    "oven": ("stove", "Dutch oven"),
    "toaster": ("toaster",),
    "sink": ("washbasin",),
    "refrigerator": ("refrigerator",),
    "book": ("book jacket", "comic book", "binder"),
    "clock": ("wall clock", "analog clock", "digital clock"),
    "vase": ("vase",),
    "teddy bear": ("teddy",),
    "hair drier": ("hand blower",),
}


def imagenet_names() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_sets(names: list[str]) -> dict[str, set[int]]:
    lookup = {n: i for i, n in enumerate(names)}
    out = {}
    for coco, targets in COCO_TO_IMAGENET.items():
        ids = set()
        for t in targets:
            if isinstance(t, int):
                ids.add(t)
            elif t in lookup:
                ids.add(lookup[t])
            else:
                raise KeyError(f"ImageNet has no class named {t!r} (mapping of {coco!r})")
        out[coco] = ids
    return out


def crop_tensor(image: Image.Image, box: tuple[float, float, float, float], size: int,
                context: float = 0.1) -> torch.Tensor:
    """The box with ``context`` of its size added on each side, squashed to size x size, in [0, 1]."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    x1, y1 = max(0.0, x1 - context * w), max(0.0, y1 - context * h)
    x2, y2 = min(image.width, x2 + context * w), min(image.height, y2 + context * h)
    crop = image.crop((x1, y1, x2, y2)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)


def scale(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "[-1,1]":
        return x * 2.0 - 1.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def batched(fn, x: torch.Tensor, bs: int = 32) -> torch.Tensor:
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def coco_crops(root: Path, min_side: float, size: int) -> tuple[torch.Tensor, list[str], int]:
    crops, labels, skipped = [], [], 0
    for split in ("train", "val"):
        data = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        files = {i["id"]: i["file_name"] for i in data["images"]}
        by_image = defaultdict(list)
        for a in data["annotations"]:
            by_image[a["image_id"]].append(a)
        for image_id, anns in sorted(by_image.items()):
            image = None
            for a in anns:
                x, y, w, h = a["bbox"]
                if a.get("iscrowd") or min(w, h) < min_side:
                    continue
                if names[a["category_id"]] not in COCO_TO_IMAGENET:
                    skipped += 1
                    continue
                image = image or Image.open(root / f"{split}2017" / files[image_id]).convert("RGB")
                crops.append(crop_tensor(image, (x, y, x + w, y + h), size))
                labels.append(names[a["category_id"]])
    return torch.stack(crops), labels, skipped


def topk_agreement(logits: torch.Tensor, labels: list[str], sets: dict[str, set[int]], k: int) -> np.ndarray:
    top = logits.topk(k, dim=1).indices.tolist()
    return np.array([bool(sets[l] & set(t)) for l, t in zip(labels, top)], dtype=np.float64)


def bccd_crops(root: Path, image_list: str, size: int) -> tuple[torch.Tensor, np.ndarray]:
    classes = ("RBC", "WBC", "Platelets")
    ids = (root / "ImageSets" / "Main" / image_list).read_text().split()
    crops, labels = [], []
    for stem in ids:
        tree = ET.parse(root / "Annotations" / f"{stem}.xml")
        image = Image.open(root / "JPEGImages" / f"{stem}.jpg").convert("RGB")
        for obj in tree.findall("object"):
            name = obj.findtext("name").strip()
            bb = obj.find("bndbox")
            x1, y1, x2, y2 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            if name not in classes or x2 - x1 < 4 or y2 - y1 < 4:
                continue
            crops.append(crop_tensor(image, (x1, y1, x2, y2), size, context=0.0))
            labels.append(classes.index(name))
    return torch.stack(crops), np.array(labels)


def cap_per_class(labels: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.extend(rng.choice(idx, size=min(cap, len(idx)), replace=False).tolist())
    return np.sort(np.array(keep))


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray,
                 l2: float = 1e-3, iters: int = 200) -> tuple[float, float]:
    """Multinomial logistic regression (L-BFGS, L2) on standardised features; (acc, balanced acc)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd
    ytr = torch.as_tensor(train_y)
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(xtr.shape[1], n_cls, requires_grad=True)
    b = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xte @ w + b).argmax(1).numpy()
    acc = float((pred == test_y).mean())
    bal = float(np.mean([(pred[test_y == c] == c).mean() for c in np.unique(test_y)]))
    return acc, bal


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=str(DATASETS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--coco-min-side", type=float, default=32.0, help="skip smaller COCO boxes")
    p.add_argument("--probe-crop-size", type=int, default=128)
    p.add_argument("--probe-train-per-class", type=int, default=150)
    p.add_argument("--probe-test-rbc", type=int, default=300, help="cap RBC test crops (majority class)")
    return p


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    datasets = Path(args.datasets)
    names = imagenet_names()
    sets = class_sets(names)
    pretrained = lite0_imagenet()
    out: dict = {}

    # 1. ImageNet head on COCO crops
    crops, labels, skipped = coco_crops(datasets / "coco-mini", args.coco_min_side, args.crop_size)
    print(f"COCO-mini: {len(labels)} crops (min side >= {args.coco_min_side:g} px) of "
          f"{len(set(labels))} mapped categories; {skipped} crops of unmapped categories left out "
          f"(unmapped: person, fire hydrant, giraffe, suitcase, frisbee, snowboard, kite, baseball "
          f"bat/glove, skateboard, surfboard, fork, knife, sandwich, carrot, donut, cake, scissors, "
          f"toothbrush)", flush=True)
    rows = []
    chance5 = float(np.mean([1 - math.comb(1000 - len(sets[l]), 5) / math.comb(1000, 5) for l in labels]))
    for mode in ("[-1,1]", "imagenet mean/std"):
        logits = batched(lambda x: pretrained(scale(x, mode)), crops)
        probs = logits.softmax(1)
        rows.append(("pretrained", mode, topk_agreement(logits, labels, sets, 1).mean(),
                     topk_agreement(logits, labels, sets, 5).mean(), float(probs.max(1).values.mean())))
        if mode == "[-1,1]":
            per_cat = defaultdict(list)
            for l, hit in zip(labels, topk_agreement(logits, labels, sets, 5)):
                per_cat[l].append(hit)
    rand_top5 = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        rnd = EfficientNetLite0().eval()
        logits = batched(lambda x: rnd(scale(x, "[-1,1]")), crops)
        rand_top5.append(topk_agreement(logits, labels, sets, 5).mean())
        if seed == 0:
            rand_top1 = topk_agreement(logits, labels, sets, 1).mean()
            rand_conf = float(logits.softmax(1).max(1).values.mean())
    r5 = mean_ci95(rand_top5)
    print("\n| network | input scaling | top-1 agreement | top-5 agreement | mean top-1 prob |")
    print("|---|---|---|---|---|")
    for net, mode, t1, t5, conf in rows:
        print(f"| {net} | {mode} | {t1:.3f} | {t5:.3f} | {conf:.3f} |")
    print(f"| random init (seed 0; top-5 mean over {args.seeds} inits) | [-1,1] | {rand_top1:.3f} | "
          f"{r5.mean:.3f} ± {r5.half_width:.3f} | {rand_conf:.3f} |")
    print(f"| chance (5 random ImageNet classes) | - | - | {chance5:.3f} | - |")
    print("\nper category, pretrained, [-1,1] (n >= 5 crops):")
    print("| COCO category | crops | top-5 agreement |")
    print("|---|---|---|")
    for cat, hits in sorted(per_cat.items(), key=lambda kv: -len(kv[1])):
        if len(hits) >= 5:
            print(f"| {cat} | {len(hits)} | {np.mean(hits):.2f} |")
    out["coco"] = {"crops": len(labels), "categories": len(set(labels)), "skipped_unmapped": skipped,
                   "pretrained": {m: {"top1": t1, "top5": t5, "conf": c} for _, m, t1, t5, c in rows},
                   "random_top5_mean": r5.mean, "random_top5_ci": r5.half_width, "chance_top5": chance5}

    # 2. Linear probe on BCCD crops
    bccd = datasets / "bccd" / "BCCD"
    rng = np.random.default_rng(0)
    tr_x, tr_y = bccd_crops(bccd, "trainval.txt", args.probe_crop_size)
    te_x, te_y = bccd_crops(bccd, "test.txt", args.probe_crop_size)
    keep = np.concatenate([np.flatnonzero(te_y != 0),
                           rng.choice(np.flatnonzero(te_y == 0), min(args.probe_test_rbc, int((te_y == 0).sum())),
                                      replace=False)])
    te_x, te_y = te_x[np.sort(keep)], te_y[np.sort(keep)]
    counts = lambda y: "/".join(str(int((y == c).sum())) for c in range(3))
    print(f"\nBCCD crops ({args.probe_crop_size} px): trainval {counts(tr_y)}, test {counts(te_y)} "
          f"(RBC/WBC/Platelets; test RBC capped at {args.probe_test_rbc})", flush=True)
    feats_pre = {"train": batched(lambda x: pretrained.embed(scale(x, "[-1,1]")), tr_x),
                 "test": batched(lambda x: pretrained.embed(scale(x, "[-1,1]")), te_x)}
    res = {"pretrained": [], "random init": []}
    for seed in range(args.seeds):
        sub = cap_per_class(tr_y, args.probe_train_per_class, np.random.default_rng(seed))
        res["pretrained"].append(linear_probe(feats_pre["train"][sub], tr_y[sub], feats_pre["test"], te_y))
        torch.manual_seed(seed)
        rnd = EfficientNetLite0().eval()
        ftr = batched(lambda x: rnd.embed(scale(x, "[-1,1]")), tr_x[sub])
        fte = batched(lambda x: rnd.embed(scale(x, "[-1,1]")), te_x)
        res["random init"].append(linear_probe(ftr, tr_y[sub], fte, te_y))
    print(f"\nlinear probe, {args.seeds} seeds (train subsample <= {args.probe_train_per_class}/class; "
          f"random init redrawn per seed), mean ± 95% CI:")
    print("| features | accuracy | balanced accuracy |")
    print("|---|---|---|")
    out["bccd"] = {}
    for name, vals in res.items():
        acc, bal = mean_ci95([v[0] for v in vals]), mean_ci95([v[1] for v in vals])
        print(f"| {name} | {acc.mean:.3f} ± {acc.half_width:.3f} | {bal.mean:.3f} ± {bal.half_width:.3f} |")
        out["bccd"][name] = {"acc": acc.mean, "acc_ci": acc.half_width, "bal": bal.mean, "bal_ci": bal.half_width,
                             "per_seed": vals}
    diff = mean_ci95([p[1] - r[1] for p, r in zip(res["pretrained"], res["random init"])])
    print(f"paired difference in balanced accuracy (pretrained - random): {diff.mean:.3f} ± {diff.half_width:.3f}")
    out["bccd"]["paired_bal_diff"] = {"mean": diff.mean, "ci": diff.half_width}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["loadavg_1m_end"] = os.getloadavg()[0]
    print(f"\n{out['seconds']} s, 1-min load average at the end {out['loadavg_1m_end']:.2f}")
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
