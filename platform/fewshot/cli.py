"""Command-line flags shared by the training jobs (base_train, add_classes, tune, ablation):
the learning-method flags, spelled and explained once."""
from __future__ import annotations

import argparse

from fewshot.method import BALANCERS


def add_method_flags(p: argparse.ArgumentParser) -> None:
    """--balancer, --balancer-momentum, --teacher, --distill-beta, --no-refine, --max-val-images."""
    p.add_argument("--balancer", default=None, choices=list(BALANCERS),
                   help="task-gradient balancer where the shared RoI feature splits into the "
                        "classification and box branches: fixed weights, pgb (precision-driven, "
                        "MTL-FSOD) or gradnorm (inverse gradient norm). Default: none")
    p.add_argument("--balancer-momentum", type=float, default=0.9,
                   help="smoothing (EMA momentum in [0, 1)) of the balancer's weights (pgb) or "
                        "gradient norms (gradnorm)")
    p.add_argument("--teacher", default=None,
                   help="CLIP teacher for distillation and refinement: 'embedded' (the domain "
                        "teacher jobs/pretrain_teacher.py trains), 'embedded:<file>', "
                        "'<open_clip model>:<pretrained tag>' or '<open_clip model>@<weights file>'. "
                        "Default: none (no distillation, no refinement)")
    p.add_argument("--distill-beta", type=float, default=0.0,
                   help="weight beta of the CLIP distillation loss on foreground RoI features "
                        "(0 = off; needs --teacher; acts only where the box head trains)")
    p.add_argument("--no-refine", action="store_true",
                   help="with --teacher, do not fit CLIP score refinement (by default the fusion "
                        "weight is chosen on the val split and stored with the version, and Serve "
                        "applies it)")
    p.add_argument("--max-val-images", type=int, default=150,
                   help="val images the refinement fusion weight is chosen on")


def method_kwargs(args: argparse.Namespace) -> dict:
    """The option fields :func:`add_method_flags` fills (BaseTrainOptions, AddClassesOptions)."""
    return {"balancer": args.balancer, "balancer_momentum": args.balancer_momentum,
            "teacher": args.teacher, "distill_beta": args.distill_beta,
            "refine": not args.no_refine, "max_val_images": args.max_val_images}
