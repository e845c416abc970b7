"""Old-class pseudo-labels on support images: the selection rule (threshold, one label per
object, the user's box wins) and the rows it returns (dropped old-class objects come back with
their classes, the input rows are unchanged, new-class annotations stay as the user gave them)."""
import pytest
import torch
from torch import nn

from catalog.kshot import sample_support
from fewshot.learning.pseudo_labels import pseudo_label_rows, select_pseudo_boxes


def test_selection_keeps_confident_boxes_one_per_object_and_never_over_a_user_box():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50],
                          [60, 60, 70, 70]], dtype=torch.float32)
    labels = torch.tensor([1, 2, 3, 4, 5])
    scores = torch.tensor([0.9, 0.8, 0.95, 0.3, 0.9])
    annotated = torch.tensor([[59, 59, 70, 70]], dtype=torch.float32)   # the user's box on object 5
    out_boxes, out_labels = select_pseudo_boxes(boxes, labels, scores, annotated, threshold=0.5)
    # box 2 is the same object as box 1 with another class: the more confident one stays;
    # box 4 is below the threshold; box 5 lies on the user's annotation
    assert sorted(out_labels.tolist()) == [1, 3]
    assert out_boxes.shape == (2, 4)
    # no annotation at all and nothing above the threshold
    b, l = select_pseudo_boxes(boxes, labels, scores, torch.zeros(0, 4), threshold=0.99)
    assert b.shape == (0, 4) and l.numel() == 0
    with pytest.raises(ValueError, match="threshold"):
        select_pseudo_boxes(boxes, labels, scores, annotated, threshold=0.0)


class _Oracle(nn.Module):
    """A parent that 'detects' the full ground truth of each image (by its size and order)
    at score 0.95, plus one junk box at 0.2 — only the bookkeeping around it is under test."""

    def __init__(self, full_rows, label_of):
        super().__init__()
        self.full, self.label_of, self.calls = list(full_rows), label_of, 0

    def forward(self, images):
        out = []
        for _ in images:
            row = self.full[self.calls]
            self.calls += 1
            keep = [(b, self.label_of[c]) for b, c in zip(row["boxes"], row["category_ids"]) if c in self.label_of]
            boxes = torch.tensor([b for b, _ in keep] + [[0.0, 0.0, 3.0, 3.0]], dtype=torch.float32)
            labels = torch.tensor([l for _, l in keep] + [1])
            scores = torch.tensor([0.95] * len(keep) + [0.2])
            out.append({"boxes": boxes, "labels": labels, "scores": scores})
        return out


def test_rows_get_back_the_old_class_objects_the_sampler_dropped(tiny_catalog):
    manifest = tiny_catalog.manifest("synthworld")
    names = [c.name for c in manifest.categories]
    old_ids = [manifest.category_by_name()[n].id for n in names[:15]]
    new_ids = [manifest.category_by_name()[n].id for n in names[15:17]]
    table = tiny_catalog.read_split("synthworld", "train")
    novel, replay = sample_support(table, new_ids, old_ids, 2, seed=0)
    rows = novel + replay
    full = {r["image_id"]: r for r in table.to_pylist()}
    label_of = {c: i + 1 for i, c in enumerate(old_ids)}
    before = [dict(r, boxes=list(r["boxes"]), category_ids=list(r["category_ids"])) for r in rows]

    out, stats = pseudo_label_rows(_Oracle([full[r["image_id"]] for r in rows], label_of), rows,
                                   old_ids, threshold=0.5, batch_size=3, device="cpu")

    assert [r["image_id"] for r in out] == [r["image_id"] for r in rows]
    assert [r["boxes"] for r in rows] == [r["boxes"] for r in before]          # input unchanged
    dropped = added = 0
    for r, o in zip(rows, out):
        n = len(r["boxes"])
        assert o["boxes"][:n] == r["boxes"] and o["category_ids"][:n] == r["category_ids"]
        assert len(o["iscrowd"]) == len(o["boxes"]) == len(o["category_ids"])
        truth = {(tuple(round(v, 3) for v in b), c) for b, c in zip(full[r["image_id"]]["boxes"],
                                                                   full[r["image_id"]]["category_ids"])}
        for b, c in zip(o["boxes"][n:], o["category_ids"][n:]):
            assert c in old_ids                                   # never a new class
            assert (tuple(round(v, 3) for v in b), c) in truth    # a real object, its own class
            assert b != [0.0, 0.0, 3.0, 3.0]                      # the junk box stayed out
        dropped += sum(1 for c in full[r["image_id"]]["category_ids"] if c in old_ids) - \
            sum(1 for c in r["category_ids"] if c in old_ids)
        added += len(o["boxes"]) - n
    assert dropped > 0
    # every dropped old-class object comes back unless it overlaps a kept box or a twin (NMS)
    assert 0.8 * dropped <= added <= dropped
    assert stats.added == added and stats.images == len(rows)
    assert stats.annotated == sum(len(r["category_ids"]) for r in rows)
