"""The promotion gate: the rule that lets a child replace its parent, and the words that
explain the decision on the version.

Like for like (ARCHITECTURE.md): parent and child are scored on the same val images, each
**as it is served** (with its CLIP refiner when it has one) and each **unrefined** (the
detector alone). A child passes only when both drops of base-class AP50 stay within their
limits, so a refiner cannot hide a detector that forgot the old classes, and a refined
parent followed by an unrefined child is judged on what users would lose.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GateFigures:
    """Base-class AP50 of parent and child on the gate's split (val)."""

    split: str
    images: int
    parent_served: float
    child_served: float
    parent_unrefined: float
    child_unrefined: float
    parent_refined: bool
    child_refined: bool
    child_nAP50: float

    @property
    def served_change(self) -> float:
        return self.child_served - self.parent_served

    @property
    def unrefined_change(self) -> float:
        return self.child_unrefined - self.parent_unrefined

    def to_dict(self) -> dict:
        return {**asdict(self), "served_change": round(self.served_change, 4),
                "unrefined_change": round(self.unrefined_change, 4)}

    def metrics(self) -> dict[str, float]:
        """The figures as run metrics (``gate/...``)."""
        return {"gate/parent_bAP50_served": self.parent_served, "gate/child_bAP50_served": self.child_served,
                "gate/parent_bAP50_unrefined": self.parent_unrefined,
                "gate/child_bAP50_unrefined": self.child_unrefined,
                "gate/bAP50_change_served": self.served_change,
                "gate/bAP50_change_unrefined": self.unrefined_change}


def _served(refined: bool) -> str:
    return "refined" if refined else "unrefined"


@dataclass(frozen=True)
class GateRule:
    """Pass when base AP50 (val) drops by at most ``max_served_drop`` as served and by at
    most ``max_detector_drop`` unrefined."""

    max_served_drop: float = 0.05
    max_detector_drop: float = 0.05

    def describe(self) -> str:
        return (f"promote when, on val, base AP50 as served drops by <= {self.max_served_drop:g} and "
                f"the detector's own (unrefined) base AP50 drops by <= {self.max_detector_drop:g}")

    def decide(self, f: GateFigures) -> tuple[bool, str]:
        served_ok = -f.served_change <= self.max_served_drop + 1e-12
        detector_ok = -f.unrefined_change <= self.max_detector_drop + 1e-12
        text = (f"base AP50 on {f.images} {f.split} images as served {f.parent_served:.4f} "
                f"({_served(f.parent_refined)} parent) -> {f.child_served:.4f} ({_served(f.child_refined)} "
                f"child), change {f.served_change:+.4f} (allowed -{self.max_served_drop:g}); detector alone "
                f"{f.parent_unrefined:.4f} -> {f.child_unrefined:.4f}, change {f.unrefined_change:+.4f} "
                f"(allowed -{self.max_detector_drop:g})")
        if served_ok and detector_ok:
            return True, "passed: " + text
        why = []
        if not served_ok:
            why.append("the base classes lost too much as served")
        if not detector_ok:
            why.append("the detector forgot the base classes" + (" (its refiner hides part of it)"
                                                                  if served_ok and f.child_refined else ""))
        return False, "failed: " + " and ".join(why) + ": " + text


def describe_version(new_classes, parent_version: int, shots: int, passed: bool, reason: str,
                     gate: GateFigures, reported, report_split: str) -> str:
    """The sentence the MLflow UI shows on a version: what it adds, from which parent, the
    gate's decision in words and the reported figures."""
    where = report_split.split(" ")[0]
    return (f"Adds {', '.join(new_classes)} ({shots} shots each) to version {parent_version}. "
            f"Gate {'passed' if passed else 'failed'} on {gate.images} val images: "
            f"{reason.split(': ', 1)[-1]}. Reported on {where}: nAP50 {reported.nAP50:.3f}, "
            f"bAP50 {reported.bAP50:.3f}, nAP {reported.nAP:.3f}, bAP {reported.bAP:.3f}.")
