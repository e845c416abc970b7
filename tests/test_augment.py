"""fewshot.model.augment: the transforms.v2 recipe keeps boxes on their objects and per-box extras aligned."""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from fewshot.model.augment import augment_sample, augmented_batches, detection_augment, dihedral_augment
from fewshot.model.batches import class_index


def _square_image(box, size=96):
    img = torch.zeros(3, size, size)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = 1.0
    return img


def test_flip_and_zoom_out_keep_the_box_on_the_object():
    box = (10, 20, 40, 60)
    img = _square_image(box)
    target = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([3])}
    transform = v2.Compose([v2.RandomHorizontalFlip(1.0), v2.RandomZoomOut(fill=0.0, side_range=(1.5, 2.0), p=1.0)])
    torch.manual_seed(0)
    out, t = augment_sample(transform, img, target)
    assert out.shape[-1] > 96  # zoomed out onto a bigger canvas
    x1, y1, x2, y2 = t["boxes"][0].round().long().tolist()
    assert (x2 - x1, y2 - y1) == (30, 40)
    inside = out[0, y1:y2, x1:x2]
    assert inside.mean() == 1.0 and out[0].sum() == inside.sum()  # the box covers exactly the object
    assert t["labels"].tolist() == [3]


def test_dihedral_recipe_moves_boxes_exactly_with_their_objects():
    # a 96 x 64 image (not square: right-angle rotations swap its sides) with one white box
    box = (10, 20, 40, 30)
    img = torch.zeros(3, 64, 96)
    img[:, 20:30, 10:40] = 1.0
    target = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([4])}
    transform = dihedral_augment(photometric_p=0.0)
    shapes, sizes = set(), set()
    torch.manual_seed(0)
    for _ in range(40):
        out, t = augment_sample(transform, img, target)
        shapes.add(tuple(out.shape[-2:]))
        x1, y1, x2, y2 = t["boxes"][0].tolist()
        assert all(float(v).is_integer() for v in (x1, y1, x2, y2))  # no resampling
        sizes.add((x2 - x1, y2 - y1))
        x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
        assert out[0, y1:y2, x1:x2].min() == 1.0 and out[0].sum() == 300  # the box covers exactly the object
        assert t["labels"].tolist() == [4]
    assert shapes == {(64, 96), (96, 64)}  # both orientations were drawn
    assert sizes == {(30.0, 10.0), (10.0, 30.0)}


def test_uint8_images_keep_their_dtype_and_values():
    # Ray Train workers hand uint8 images over (converted on the device); clamping to [0, 1]
    # would wipe them
    img = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    target = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 12.0]]), "labels": torch.tensor([1])}
    torch.manual_seed(1)
    out, t = augment_sample(dihedral_augment(photometric_p=0.0), img, target)
    assert out.dtype == torch.uint8 and out.max() > 1
    assert sorted(out.flatten().tolist()) == sorted(img.flatten().tolist())  # pixels permuted only


def test_degenerate_boxes_drop_with_their_labels_and_embeddings():
    img = torch.rand(3, 64, 64)
    target = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0], [40.0, 40.0, 40.5, 60.0]]),
              "labels": torch.tensor([1, 2]), "teacher_emb": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    out, t = augment_sample(detection_augment(zoom_out_p=0.0, photometric_p=0.0), img, target)
    assert t["labels"].tolist() == [1]
    assert t["teacher_emb"].tolist() == [[1.0, 0.0]]
    assert t["boxes"].shape == (1, 4)


def test_augmented_batches_are_seeded_and_leave_the_global_rng_alone(tiny_catalog):
    manifest = tiny_catalog.manifest("synthworld")
    rows = tiny_catalog.read_split("synthworld", "train").to_pylist()[:12]
    index = class_index([c.id for c in manifest.categories])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = next(augmented_batches(rows, index, 4, seed=7))
    assert torch.equal(torch.get_rng_state(), before)
    b = next(augmented_batches(rows, index, 4, seed=7))
    for (ia, ta), (ib, tb) in zip(zip(*a), zip(*b)):
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
    for image, target in zip(*a):
        assert image.min() >= 0 and image.max() <= 1
        assert len(target["boxes"]) == len(target["labels"])
        h, w = image.shape[-2:]
        assert (target["boxes"][:, 2] <= w).all() and (target["boxes"][:, 3] <= h).all()
