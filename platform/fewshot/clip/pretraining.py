"""Contrastive pretraining of the embedded CLIP teacher on the captioned synthetic corpus.

The platform's stand-in for web-scale CLIP pretraining (Radford et al. 2021): the embedded
OpenCLIP model (:data:`fewshot.clip.teacher.EMBEDDED_MODEL_CFG`) learns from
(image, caption) pairs of :mod:`catalog.captions` with the symmetric InfoNCE loss, through
open_clip's own ``ClipLoss``: for a batch of N pairs, cross-entropy of the N x N
image-text similarity matrix (scaled by the learned ``logit_scale``) against the diagonal,
averaged over the image->text and text->image directions.

One explicit loop you can read top to bottom (:func:`train_embedded_teacher`): render a
fixed pool of corpus pairs once, then every step sample a batch, rotate each image by a
random multiple of 90 degrees (a shape's class does not change with rotation), draw a fresh
caption for each pair from the templates (caption augmentation), take an AdamW step with
warmup and cosine decay, and clamp the logit scale at 100 as CLIP does. Images whose
fresh caption names no colour get their RGB channels shuffled half of the time (the
caption stays true), which keeps colour from being the cheapest way to match captions.
For the same reason 90% of object captions name the shape alone (``plain_prob``): with a
CPU budget of a few hundred steps, a corpus rich in colour words teaches colour and leaves
the class prompts nearly identical (see :mod:`catalog.captions`).

Math layer: no ray, no mlflow. :func:`zero_shot_accuracy` is the figure the pretraining
job reports: top-1 of crops classified by their nearest class prompt embedding.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from catalog.captions import CaptionedImage, captioned_corpus, object_caption, scene_caption
from fewshot.clip.teacher import EMBEDDED_MODEL_CFG, EMBEDDED_MODEL_NAME, Teacher, create_embedded_model

__all__ = [
    "CorpusPool", "build_corpus_pool", "lr_at", "clip_loss", "train_embedded_teacher",
    "zero_shot_predict", "zero_shot_accuracy", "zero_shot_report",
]


@dataclass
class CorpusPool:
    """Corpus pairs held in memory for training: images plus what captions are drawn from."""

    images: torch.Tensor                      # [N, 3, S, S] uint8
    kinds: list[str]                          # "object" | "scene"
    categories: list[str | None]
    attributes: list[dict]
    captions: list[str] = field(default_factory=list)  # the captions drawn at render time

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def from_pairs(cls, pairs: Sequence[CaptionedImage]) -> "CorpusPool":
        if not pairs:
            raise ValueError("the corpus is empty")
        images = torch.from_numpy(np.stack([p.image for p in pairs])).permute(0, 3, 1, 2).contiguous()
        return cls(images=images, kinds=[p.kind for p in pairs],
                   categories=[p.category for p in pairs],
                   attributes=[dict(p.attributes) for p in pairs],
                   captions=[p.caption for p in pairs])

    def draw_captions(self, indices: Sequence[int], rng: np.random.Generator,
                      synonym_prob: float = 0.15, plain_prob: float = 0.9) -> list[str]:
        """A freshly drawn caption for each pair (another template, same facts)."""
        out = []
        for i in indices:
            i = int(i)
            if self.kinds[i] == "object":
                a = self.attributes[i]
                out.append(object_caption(self.categories[i], rng, colour=a.get("colour", ""),
                                          texture=a.get("texture", ""), size=a.get("size", ""),
                                          synonym_prob=synonym_prob, plain_prob=plain_prob))
            else:
                counts = self.attributes[i].get("counts", {})
                names = [n for n, k in counts.items() for _ in range(int(k))]
                out.append(scene_caption(names, rng, synonym_prob=synonym_prob))
        return out


def build_corpus_pool(n_pairs: int, seed: int = 0, crop_size: int = 64,
                      scene_captions: bool | int = 2) -> CorpusPool:
    """Render ``n_pairs`` corpus pairs (about 3 ms each) into a :class:`CorpusPool`."""
    return CorpusPool.from_pairs(captioned_corpus(n_pairs, seed=seed, crop_size=crop_size,
                                                  scene_captions=scene_captions))


def lr_at(step: int, steps: int, base_lr: float, warmup: int) -> float:
    """Linear warmup for ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


_CLIP_LOSS = None


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of normalised features (open_clip's ``ClipLoss``, one process)."""
    global _CLIP_LOSS
    if _CLIP_LOSS is None:
        from open_clip import ClipLoss

        _CLIP_LOSS = ClipLoss()
    return _CLIP_LOSS(image_features, text_features, logit_scale)


def _param_groups(model, weight_decay: float, text_lr_scale: float = 1.0) -> list[dict]:
    # open_clip's training recipe: no decay on gains, biases, norms and the logit scale;
    # "lr_scale" multiplies the scheduled learning rate of a group (the text tower's)
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    def is_text(n):
        return not n.startswith("visual.") and n != "logit_scale"

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for text in (False, True):
        for decay in (False, True):
            params = [p for n, p in named if is_text(n) == text and exclude(n, p) != decay]
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                               "lr_scale": text_lr_scale if text else 1.0})
    return groups


def _adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    # the fused kernel is several times faster on CPU (the 49408-token embedding dominates)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _normalise(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float().div_(255.0) - mean) / std


def _colour_mentioned(caption: str, attrs: dict) -> bool:
    colour = attrs.get("colour")
    return bool(colour) and colour in caption.split(" ")


def _shuffle_channels(x: torch.Tensor, rows: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Random RGB channel permutations of images ``rows`` (colour changes, shape does not)."""
    for i in rows:
        x[int(i)] = x[int(i)][torch.from_numpy(rng.permutation(3))]
    return x


def _rotate90(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    k = rng.integers(0, 4, size=x.shape[0])
    out = x.clone()
    for r in (1, 2, 3):
        sel = np.flatnonzero(k == r)
        if sel.size:
            idx = torch.from_numpy(sel)
            out[idx] = torch.rot90(x[idx], r, dims=(2, 3))
    return out


def train_embedded_teacher(
    steps: int = 3000,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool | Callable[[int, dict], None] = False,
    *,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup: int | None = None,
    corpus_pairs: int = 8000,
    corpus: CorpusPool | None = None,
    scene_captions: bool | int = 2,
    model_cfg: dict | None = None,
    model_name: str = EMBEDDED_MODEL_NAME,
    threads: int | None = None,
    max_logit_scale: float = 100.0,
    log_every: int = 25,
    augment: bool = True,
    init_logit_scale: float | None = None,
    text_lr_scale: float = 1.0,
    plain_prob: float = 0.9,
) -> tuple[Teacher, dict]:
    """Train the embedded teacher from scratch; return it (frozen, as a :class:`Teacher`)
    and metrics (losses at the start and end, timings, in-batch retrieval accuracy).

    ``corpus`` (a :class:`CorpusPool`) replaces rendering ``corpus_pairs`` fresh pairs.
    ``augment=False`` turns off the random 90-degree rotations and caption redrawing (each
    pair keeps the caption it was rendered with). ``init_logit_scale`` starts the learnable
    logit scale (1 / temperature) at that value instead of open_clip's 1/0.07;
    ``text_lr_scale`` multiplies the text tower's learning rate; ``plain_prob`` is the share
    of redrawn object captions that name the shape alone.
    ``progress``: True for a tqdm bar, or a callable ``(step, logs)`` called every
    ``log_every`` steps. ``threads`` sets ``torch.set_num_threads`` for the run (on a
    busy machine one thread can be several times faster than oversubscribed ones).
    """
    if steps < 1 or batch_size < 2:
        raise ValueError("need steps >= 1 and batch_size >= 2")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng([int(seed), 271828])
        cfg = model_cfg if model_cfg is not None else EMBEDDED_MODEL_CFG
        t0 = time.perf_counter()
        if corpus is None:
            corpus = build_corpus_pool(corpus_pairs, seed=seed,
                                       crop_size=int(cfg["vision_cfg"]["image_size"]),
                                       scene_captions=scene_captions)
        corpus_seconds = time.perf_counter() - t0

        model, name = create_embedded_model(cfg, model_name)
        if init_logit_scale is not None:
            with torch.no_grad():
                model.logit_scale.fill_(math.log(float(init_logit_scale)))
        from open_clip import get_tokenizer

        tokenizer = get_tokenizer(name)
        pp = model.visual.preprocess_cfg
        mean = torch.tensor(pp["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(pp["std"], dtype=torch.float32).view(1, 3, 1, 1)
        size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list))
                   else model.visual.image_size)
        if corpus.images.shape[-1] != size:
            raise ValueError(f"corpus images are {corpus.images.shape[-1]} px, model wants {size}")

        groups = _param_groups(model, weight_decay, text_lr_scale)
        opt = _adamw(groups, lr)
        warmup = max(1, steps // 20) if warmup is None else int(warmup)
        bar = None
        if progress is True:
            from catalog.progress import progress_bar

            bar = progress_bar(steps, "teacher", "step")
        callback = progress if callable(progress) else None

        n = len(corpus)
        order = rng.permutation(n)
        cursor = 0
        losses: list[float] = []
        accs: list[float] = []
        model.train()
        t1 = time.perf_counter()
        for step in range(steps):
            if cursor + batch_size > n:
                order, cursor = rng.permutation(n), 0
            idx = order[cursor:cursor + batch_size]
            cursor += batch_size
            batch = corpus.images[torch.from_numpy(idx)]
            if augment:
                batch = _rotate90(batch, rng)
                captions = corpus.draw_captions(idx, rng, plain_prob=plain_prob)
                # a caption that names no colour stays true under a colour change: shuffle
                # the channels of half of those images, so colour alone cannot match them
                free = [k for k, i in enumerate(idx)
                        if not _colour_mentioned(captions[k], corpus.attributes[int(i)])]
                batch = _shuffle_channels(batch, np.asarray(free)[rng.random(len(free)) < 0.5], rng)
            else:
                captions = [corpus.captions[i] for i in idx]
            images = _normalise(batch, mean, std)
            texts = tokenizer(captions)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup) * g["lr_scale"]
            img_f = model.encode_image(images, normalize=True)
            txt_f = model.encode_text(texts, normalize=True)
            scale = model.logit_scale.exp()
            loss = clip_loss(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(max_logit_scale))
                acc = (img_f @ txt_f.T).argmax(1).eq(torch.arange(len(idx))).float().mean()
            losses.append(float(loss.detach()))
            accs.append(float(acc))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            if callback is not None and (step % log_every == 0 or step == steps - 1):
                callback(step, {"loss": losses[-1], "batch_i2t_acc": accs[-1],
                                "lr": opt.param_groups[0]["lr"], "logit_scale": float(scale.detach())})
        train_seconds = time.perf_counter() - t1
        if bar is not None:
            bar.close()
    finally:
        torch.set_num_threads(old_threads)

    k = max(1, min(20, steps // 5))
    metrics = {
        "steps": steps,
        "batch_size": batch_size,
        "corpus_pairs": len(corpus),
        "loss_start": float(np.mean(losses[:k])),
        "loss_end": float(np.mean(losses[-k:])),
        "batch_i2t_acc_end": float(np.mean(accs[-k:])),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "corpus_seconds": corpus_seconds,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / steps,
        "losses": losses,
    }
    teacher = Teacher.from_model(model, name, spec="")
    teacher.info = {k: v for k, v in metrics.items() if k != "losses"}
    return teacher, metrics


# ---- zero-shot classification ---------------------------------------------------------------

def zero_shot_predict(teacher: Teacher, crops: Sequence, class_names: Sequence[str],
                      templates: Sequence[str] | None = None) -> np.ndarray:
    """Index into ``class_names`` of the nearest class prompt embedding, per crop."""
    if len(crops) == 0:
        return np.zeros((0,), dtype=np.int64)
    classes = teacher.class_prompt_embeddings(list(class_names), templates)
    sims = teacher.embed_images(list(crops)) @ classes.T
    return sims.argmax(dim=1).numpy()


def zero_shot_accuracy(teacher: Teacher, crops: Sequence, labels: Sequence,
                       class_names: Sequence[str], templates: Sequence[str] | None = None) -> float:
    """Top-1 accuracy of zero-shot classification of ``crops`` among ``class_names``.

    ``labels`` are class names or indices into ``class_names``. NaN for no crops."""
    if len(crops) != len(labels):
        raise ValueError(f"{len(crops)} crops but {len(labels)} labels")
    if len(crops) == 0:
        return float("nan")
    names = list(class_names)
    lookup = {n: i for i, n in enumerate(names)}
    truth = np.asarray([lookup[l] if isinstance(l, str) else int(l) for l in labels])
    pred = zero_shot_predict(teacher, crops, names, templates)
    return float(np.mean(pred == truth))


def zero_shot_report(teacher: Teacher, crops: Sequence, labels: Sequence[str],
                     class_names: Sequence[str],
                     subsets: Mapping[str, Sequence[str]] | None = None,
                     templates: Sequence[str] | None = None) -> dict[str, float]:
    """Zero-shot top-1 figures from one pass of embeddings.

    ``"all"``: crops classified among all ``class_names``. For each subset ``name`` (e.g.
    the novel classes of a split), over the crops whose label is in the subset:
    ``name`` (classified among the subset's classes only, pure zero-shot) and
    ``name + "_gzsl"`` (among all classes, the generalised setting), plus
    ``"count_" + name``. NaN where there are no crops."""
    names = list(class_names)
    lookup = {n: i for i, n in enumerate(names)}
    truth = np.asarray([lookup[l] for l in labels], dtype=np.int64)
    out: dict[str, float] = {"count_all": float(len(truth))}
    if len(truth) == 0:
        out["all"] = float("nan")
        for name in (subsets or {}):
            out[name] = out[f"{name}_gzsl"] = float("nan")
            out[f"count_{name}"] = 0.0
        return out
    sims = (teacher.embed_images(list(crops)) @ teacher.class_prompt_embeddings(names, templates).T).numpy()
    out["all"] = float(np.mean(sims.argmax(1) == truth))
    for name, members in (subsets or {}).items():
        cols = np.asarray([lookup[m] for m in members], dtype=np.int64)
        sel = np.isin(truth, cols)
        out[f"count_{name}"] = float(sel.sum())
        if not sel.any():
            out[name] = out[f"{name}_gzsl"] = float("nan")
            continue
        sub = sims[sel]
        out[name] = float(np.mean(cols[sub[:, cols].argmax(1)] == truth[sel]))
        out[f"{name}_gzsl"] = float(np.mean(sub.argmax(1) == truth[sel]))
    return out
