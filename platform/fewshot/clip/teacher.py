"""The CLIP teacher: an OpenCLIP model that embeds box crops, whole images and text prompts.

Used by CLIP knowledge distillation (teacher embeddings of ground-truth boxes, see
:mod:`fewshot.clip.distillation` and :mod:`catalog.teacher_cache`) and by CLIP classification
refinement at inference (:mod:`fewshot.clip.refinement`). Part of the math layer: no ray, no
mlflow; ``open_clip`` is imported on first use, so importing this module is cheap.

A teacher is named by a **spec** string (:func:`load_teacher`):

``embedded:<path>``
    a checkpoint of the embedded domain teacher written by :func:`save_embedded_teacher`
    (trained on the captioned synthetic corpus by :mod:`fewshot.clip.pretraining`).
    ``embedded`` alone means :func:`default_teacher_path`. The path may be a URI
    (``s3://bucket/teachers/embedded-teacher.pt`` or any ``pyarrow.fs`` scheme, read through
    :func:`catalog.storage.resolve_uri`): the spec a version records then loads on every node
    of a cluster, not only where the file was written.
``<model_name>:<pretrained_tag>``
    an OpenCLIP architecture with published weights, e.g. ``ViT-B-32:laion2b_s34b_b79k``,
    via ``open_clip.create_model_and_transforms(name, pretrained=tag)`` (needs the weights
    in the open_clip / Hugging Face cache or a reachable hub).
``<model_name>@<file>``
    an OpenCLIP architecture with weights from a local checkpoint file.
``hf-hub:<org/repo>`` / ``local-dir:<folder>``
    open_clip's own schemas, passed through.

The embedded teacher is a real OpenCLIP ``CLIP`` model (ModifiedResNet image tower,
transformer text tower, open_clip's BPE tokenizer), created through open_clip's
model-config registry: its
config dict (:data:`EMBEDDED_MODEL_CFG`, stored again inside every checkpoint) is written
as ``<name>.json`` and registered with ``open_clip.add_model_config``, then built with
``open_clip.create_model(name)``. It is small enough (64 px crops, 0.4 M image-tower
parameters) to train on a CPU.

Every embedding this module returns is L2-normalised and detached, on the CPU, float32.
"""
from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from catalog.crops import crop_box, to_uint8_rgb
from catalog.storage import is_uri, resolve_uri
from fewshot.model.devices import resolve_device

__all__ = [
    "EMBEDDED_PREFIX", "EMBEDDED_MODEL_NAME", "EMBEDDED_MODEL_CFG", "EMBEDDED_FORMAT",
    "DEFAULT_PROMPT_TEMPLATES", "TEACHER_DIR_ENV", "TeacherSpec", "Teacher",
    "default_teacher_path", "parse_teacher_spec", "register_model_config",
    "create_embedded_model", "save_embedded_teacher", "load_teacher", "sanitize_id",
]

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_FORMAT = "fewshot-embedded-clip"
EMBEDDED_FORMAT_VERSION = 1
TEACHER_DIR_ENV = "FEWSHOT_TEACHER_DIR"

# The embedded teacher's architecture, in open_clip's model-config format (the same keys as
# open_clip/model_configs/RN50.json): CLIP's ModifiedResNet image tower (a list of block
# counts selects it; stem width 8 -> stage widths 32..256, attention pooling) on 64 px crops,
# and a 2-block text transformer of width 128 over open_clip's BPE tokens (captions <= 16
# tokens). A ResNet rather than a ViT: on a few thousand CPU steps from scratch the
# convolutional tower learns shapes far sooner (a tiny ViT stayed near chance).
EMBEDDED_MODEL_NAME = "fewshot-embedded-rn-t64"
EMBEDDED_MODEL_CFG: dict = {
    "embed_dim": 128,
    "vision_cfg": {
        "image_size": 64,
        "layers": [1, 1, 1, 1],
        "width": 8,
        "patch_size": None,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 128,
        "heads": 4,
        "layers": 2,
    },
}

# Prompt ensemble for class embeddings. The first ones follow CLIP's ImageNet prompts; the
# rest match how the embedded corpus captions objects (catalog.captions.OBJECT_TEMPLATES).
DEFAULT_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "a {} shape.",
    "a photo of the {}.",
    "a close-up of a {}.",
    "a drawing of a {}.",
)


def default_teacher_path() -> Path:
    """Where ``embedded`` (no path) looks: ``$FEWSHOT_TEACHER_DIR/embedded-teacher.pt``,
    default ``~/.cache/fewshot/teachers/embedded-teacher.pt``."""
    root = os.environ.get(TEACHER_DIR_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "fewshot" / "teachers"
    return base / "embedded-teacher.pt"


def sanitize_id(text: str) -> str:
    """A file-system safe identifier (letters, digits, ``.``, ``_``, ``-``)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return out or "teacher"


# ---- specs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TeacherSpec:
    """A parsed spec: ``kind`` is ``embedded``, ``pretrained``, ``file`` or ``schema``."""

    kind: str
    model_name: str | None
    source: str | None       # checkpoint path, pretrained tag, or schema identifier
    text: str                # the spec as given


def parse_teacher_spec(spec: str) -> TeacherSpec:
    """Parse a teacher spec string (see the module docstring); raises ``ValueError``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("teacher spec must be a non-empty string")
    s = spec.strip()
    if s == "embedded":
        return TeacherSpec("embedded", None, str(default_teacher_path()), s)
    if s.startswith(EMBEDDED_PREFIX):
        path = s[len(EMBEDDED_PREFIX):]
        if not path:
            raise ValueError("spec 'embedded:' needs a checkpoint path after the colon")
        return TeacherSpec("embedded", None, path, s)
    if s.startswith(("hf-hub:", "local-dir:")):
        return TeacherSpec("schema", s, None, s)
    if "@" in s:
        name, _, path = s.partition("@")
        if not name or not path:
            raise ValueError(f"spec {s!r}: expected '<model_name>@<checkpoint file>'")
        return TeacherSpec("file", name, path, s)
    if ":" in s:
        name, _, tag = s.partition(":")
        if not name or not tag:
            raise ValueError(f"spec {s!r}: expected '<model_name>:<pretrained_tag>'")
        return TeacherSpec("pretrained", name, tag, s)
    if s.endswith((".pt", ".pth")) and Path(s).is_file():
        return TeacherSpec("embedded", None, s, s)
    raise ValueError(
        f"teacher spec {s!r} not understood: use 'embedded:<path>', "
        "'<model_name>:<pretrained_tag>' (e.g. ViT-B-32:laion2b_s34b_b79k), "
        "'<model_name>@<checkpoint file>', 'hf-hub:<repo>' or 'local-dir:<folder>'"
    )


# ---- open_clip model configs ----------------------------------------------------------------

_CONFIG_LOCK = threading.Lock()
_CONFIG_DIR: Path | None = None


def _open_clip():
    import open_clip  # deferred: importing open_clip takes seconds

    return open_clip


def _cfg_hash(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def register_model_config(name: str, cfg: dict) -> str:
    """Register ``cfg`` with open_clip's model-config registry as ``name``; return the name.

    The dict is written as ``<name>.json`` into a private folder that is added with
    ``open_clip.add_model_config``. Registering the same config twice is a no-op; if
    ``name`` is already taken by a *different* config, ``<name>-<hash>`` is used instead
    (so an old checkpoint with its stored config never gets a mismatched architecture).
    """
    open_clip = _open_clip()
    global _CONFIG_DIR
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError("an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    with _CONFIG_LOCK:
        existing = open_clip.get_model_config(name)
        if existing is not None:
            if existing == cfg:
                return name
            name = f"{name}-{_cfg_hash(cfg)}"
            existing = open_clip.get_model_config(name)
            if existing == cfg:
                return name
        if _CONFIG_DIR is None:
            _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="fewshot-openclip-cfg-"))
            atexit.register(shutil.rmtree, _CONFIG_DIR, True)  # registered configs stay in memory
        path = _CONFIG_DIR / f"{name}.json"
        path.write_text(json.dumps(cfg, indent=2))
        open_clip.add_model_config(path)
        if open_clip.get_model_config(name) != cfg:
            raise RuntimeError(f"open_clip did not register model config {name!r}")
    return name


def create_embedded_model(cfg: dict | None = None, name: str = EMBEDDED_MODEL_NAME):
    """A randomly initialised embedded teacher (an ``open_clip.CLIP``) and its config name."""
    open_clip = _open_clip()
    import logging

    cfg = json.loads(json.dumps(cfg if cfg is not None else EMBEDDED_MODEL_CFG))
    name = register_model_config(name, cfg)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded
    try:
        model = open_clip.create_model(name)
    finally:
        root.setLevel(level)
    return model, name


# ---- the teacher ---------------------------------------------------------------------------

def _file_digest(path: Path, whole_limit: int = 256 << 20) -> str:
    """sha256 of the file (of its size, head and tail when larger than ``whole_limit``)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= whole_limit:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(str(size).encode())
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()


class Teacher:
    """A frozen OpenCLIP model with the embedding calls the platform needs.

    ``id`` names the weights (the same weights give the same id wherever they are loaded;
    for the embedded teacher it is a hash of the state dict);
    caches and refinement data are keyed by it. ``spec`` is how to load it again.
    """

    def __init__(self, model, tokenizer, *, spec: str, id: str, model_name: str = "",
                 device: str | torch.device | None = None, batch_size: int = 256,
                 templates: Sequence[str] = DEFAULT_PROMPT_TEMPLATES, box_context: float = 0.2):
        device = resolve_device(device)  # None: CUDA when available, else the CPU
        # channels-last convolutions: the crop batches of refinement run 1.8x faster on one CPU
        # thread (benchmarks/refine_crops.py); same values, only the weights' memory layout
        self.model = model.eval().to(device).to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.id = sanitize_id(id)
        self.model_name = model_name
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.templates = tuple(templates)
        self.box_context = float(box_context)
        self.info: dict = {}  # what the checkpoint recorded (training metrics, corpus)
        visual = model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        mean = cfg.get("mean", getattr(visual, "image_mean", None)) or (0.48145466, 0.4578275, 0.40821073)
        std = cfg.get("std", getattr(visual, "image_std", None)) or (0.26862954, 0.26130258, 0.27577711)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    # -- properties
    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        return int(self.embed_texts(["a"]).shape[1])

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale) of the model: 1 / the temperature it was trained with."""
        return float(self.model.logit_scale.detach().exp().cpu())

    def __repr__(self) -> str:
        return f"Teacher(id={self.id!r}, spec={self.spec!r}, image_size={self.image_size})"

    # -- preprocessing
    def preprocess(self, images: Iterable) -> torch.Tensor:
        """Images (PIL, HxWx3 uint8 arrays, or encoded bytes) -> normalised [N, 3, S, S].

        Every image is resized to the model's square input (no centre crop: box crops are
        already square, see :func:`catalog.crops.crop_box`)."""
        arrays = []
        s = self.image_size
        for im in images:
            arr = to_uint8_rgb(im)
            if arr.shape[0] != s or arr.shape[1] != s:
                arr = np.asarray(Image.fromarray(arr).resize((s, s), Image.BICUBIC))
            arrays.append(arr)
        if not arrays:
            return torch.zeros((0, 3, s, s))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    # -- embeddings
    @torch.no_grad()
    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixel batch [N, 3, S, S] -> L2-normalised embeddings [N, E]."""
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            chunk = x[i:i + self.batch_size].to(self.device).contiguous(memory_format=torch.channels_last)
            f = self.model.encode_image(chunk)
            out.append(F.normalize(f.float(), dim=-1).cpu())
        if not out:
            return torch.zeros((0, self.embed_dim))
        return torch.cat(out)

    def embed_images(self, images: Sequence) -> torch.Tensor:
        """L2-normalised image embeddings [N, E] of whole images or crops."""
        return self.encode_pixels(self.preprocess(images))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [M, E]."""
        texts = list(texts)
        if not texts:
            raise ValueError("embed_texts needs at least one text")
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i:i + self.batch_size]).to(self.device)
            f = self.model.encode_text(tokens)
            out.append(F.normalize(f.float(), dim=-1).cpu())
        return torch.cat(out)

    def class_prompt_embeddings(self, class_names: Sequence[str],
                                templates: Sequence[str] | None = None) -> torch.Tensor:
        """One embedding per class [C, E]: the normalised mean of the class's prompts
        (CLIP's prompt ensembling) over ``templates`` (default: :data:`DEFAULT_PROMPT_TEMPLATES`)."""
        templates = tuple(templates or self.templates)
        names = [str(n).replace("_", " ") for n in class_names]
        if not names:
            raise ValueError("class_prompt_embeddings needs at least one class name")
        texts = [t.format(n) for n in names for t in templates]
        emb = self.embed_texts(texts).view(len(names), len(templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    def box_crops(self, image, boxes) -> list[np.ndarray]:
        """The square crops (with ``box_context`` context) the teacher embeds for ``boxes``."""
        arr = to_uint8_rgb(image) if not isinstance(image, torch.Tensor) else _tensor_to_uint8(image)
        boxes = _as_box_list(boxes)
        return [crop_box(arr, b, size=self.image_size, context=self.box_context) for b in boxes]

    def embed_boxes(self, image, boxes) -> torch.Tensor:
        """Embeddings [n, E] of the crops of ``boxes`` ([n, 4] pixels x1 y1 x2 y2) in
        ``image`` (PIL, HxWx3 uint8, encoded bytes, or a [3, H, W] float tensor in 0..1)."""
        crops = self.box_crops(image, boxes)
        if not crops:
            return torch.zeros((0, self.embed_dim))
        return self.embed_images(crops)

    def embed_boxes_many(self, images: Sequence, boxes: Sequence) -> list[torch.Tensor]:
        """:meth:`embed_boxes` for many images at once (crops batched together)."""
        crops, counts = [], []
        for image, bx in zip(images, boxes, strict=True):
            c = self.box_crops(image, bx)
            crops += c
            counts.append(len(c))
        if not crops:
            return [torch.zeros((0, self.embed_dim)) for _ in counts]
        emb = self.embed_images(crops)
        return list(torch.split(emb, counts))

    def classify(self, images: Sequence, class_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [N, C] of images to (normalised) class embeddings."""
        return self.embed_images(images) @ class_embeddings.T.cpu()

    # -- construction
    @classmethod
    def from_model(cls, model, model_name: str, *, spec: str = "", id: str | None = None,
                   **kwargs) -> "Teacher":
        """Wrap an open_clip model built from a registered config name (e.g. just trained)."""
        tokenizer = _open_clip().get_tokenizer(model_name)
        if id is None:
            h = hashlib.sha256()
            for k, v in sorted(model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().float().numpy().tobytes())
            id = f"embedded-{h.hexdigest()[:12]}"
        return cls(model, tokenizer, spec=spec, id=id, model_name=model_name, **kwargs)


def _tensor_to_uint8(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.ndim != 3:
        raise ValueError(f"expected a [3, H, W] image tensor, got shape {tuple(t.shape)}")
    if t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
        t = t.permute(1, 2, 0)
    if t.dtype != torch.uint8:
        scale = 255.0 if float(t.max()) <= 1.0 else 1.0
        t = (t.float() * scale).clamp(0, 255).to(torch.uint8)
    arr = t.numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def _as_box_list(boxes) -> list[list[float]]:
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().tolist()
    elif isinstance(boxes, np.ndarray):
        boxes = boxes.tolist()
    out = [list(map(float, b)) for b in boxes]
    for b in out:
        if len(b) != 4:
            raise ValueError(f"boxes must be [x1, y1, x2, y2], got {b}")
    return out


# ---- saving and loading ---------------------------------------------------------------------

def save_embedded_teacher(path: str | Path, model, *, model_name: str = EMBEDDED_MODEL_NAME,
                          model_cfg: dict | None = None, info: dict | None = None) -> Path | str:
    """Write an embedded teacher checkpoint (config + weights + ``info``) atomically, to a local
    path or a URI (``s3://...``; returned as given).

    The file is self-describing: :func:`load_teacher` re-registers the stored config with
    open_clip, so it loads even if :data:`EMBEDDED_MODEL_CFG` changes later."""
    open_clip = _open_clip()
    cfg = model_cfg if model_cfg is not None else open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"no open_clip config registered as {model_name!r}; pass model_cfg")
    payload = {
        "format": EMBEDDED_FORMAT,
        "format_version": EMBEDDED_FORMAT_VERSION,
        "model_name": model_name,
        "model_cfg": json.loads(json.dumps(cfg)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "info": json.loads(json.dumps(info or {})),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    if is_uri(path):  # object storage: one PUT is atomic, readers see the old or the new object
        fs, key = resolve_uri(str(path))
        parent = key.rsplit("/", 1)[0]
        if parent and parent != key:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(key) as out:
            out.write(buf.getvalue())
        return str(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def _read_embedded_payload(source: str) -> tuple[dict, str]:
    """The checkpoint dict behind a local path or a URI, and the location it was read from."""
    if is_uri(source) and not source.startswith("file://"):
        fs, key = resolve_uri(source)
        try:
            with fs.open_input_file(key) as f:
                data = f.read()
        except (FileNotFoundError, OSError) as err:
            raise FileNotFoundError(
                f"embedded teacher checkpoint {source} cannot be read ({err}); write one there with "
                "`python jobs/pretrain_teacher.py --out URI`") from None
        where = source
    else:
        path = Path(source.removeprefix("file://")).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(
                f"embedded teacher checkpoint {path} not found; train one with "
                "`python jobs/pretrain_teacher.py --out PATH`"
            )
        data, where = path.read_bytes(), str(path)
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != EMBEDDED_FORMAT:
        raise ValueError(f"{where} is not an embedded teacher checkpoint ({EMBEDDED_FORMAT})")
    if payload.get("format_version") != EMBEDDED_FORMAT_VERSION:
        raise ValueError(f"{where}: unsupported format version {payload.get('format_version')!r}")
    return payload, where


def _load_embedded(source: str, device, **kwargs) -> Teacher:
    payload, where = _read_embedded_payload(source)
    spec = f"{EMBEDDED_PREFIX}{where}"
    model, name = create_embedded_model(payload["model_cfg"], payload.get("model_name") or EMBEDDED_MODEL_NAME)
    model.load_state_dict(payload["state_dict"])
    # id from the weights (not the file bytes): the trainer's Teacher has the same id
    teacher = Teacher.from_model(model, name, spec=spec, device=device, **kwargs)
    teacher.info = payload.get("info", {})
    return teacher


def load_teacher(spec: str, device: str | torch.device | None = None, **kwargs) -> Teacher:
    """Load the teacher a spec names (see the module docstring) onto ``device`` (default: CUDA
    when available, else the CPU); extra kwargs go to :class:`Teacher` (``batch_size``,
    ``templates``, ``box_context``)."""
    parsed = parse_teacher_spec(spec)
    device = resolve_device(device)
    if parsed.kind == "embedded":
        return _load_embedded(parsed.source, device, **kwargs)
    open_clip = _open_clip()
    if parsed.kind == "schema":
        model, _, _ = open_clip.create_model_and_transforms(parsed.model_name, device=device)
        tokenizer = open_clip.get_tokenizer(parsed.model_name)
        tid = sanitize_id(parsed.model_name.replace("hf-hub:", "hf-").replace("local-dir:", "dir-"))
        if parsed.model_name.startswith("local-dir:"):
            tid = f"{tid[-40:]}-{hashlib.sha1(str(Path(parsed.model_name[10:]).resolve()).encode()).hexdigest()[:8]}"
        return Teacher(model, tokenizer, spec=parsed.text, id=tid, model_name=parsed.model_name,
                       device=device, **kwargs)
    if parsed.kind == "file":
        path = Path(parsed.source).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"teacher weights {path} not found (spec {spec!r})")
        model, _, _ = open_clip.create_model_and_transforms(parsed.model_name, pretrained=str(path),
                                                            device=device)
        tid = f"{parsed.model_name}-{path.stem}-{_file_digest(path)[:10]}"
        spec_text = f"{parsed.model_name}@{path}"
    else:  # pretrained tag
        model, _, _ = open_clip.create_model_and_transforms(parsed.model_name, pretrained=parsed.source,
                                                            device=device)
        tid = f"{parsed.model_name}-{parsed.source}"
        spec_text = parsed.text
    tokenizer = open_clip.get_tokenizer(parsed.model_name)
    return Teacher(model, tokenizer, spec=spec_text, id=tid, model_name=parsed.model_name,
                   device=device, **kwargs)
