"""Long loops print one progress line every few seconds outside a terminal (a Ray job log),
not one per step."""
import itertools

import torch
from torch import nn

from fewshot.learning.loop import TrainConfig, train


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, images, targets):
        return {"loss_a": (self.w - 2.0).pow(2).sum()}


def test_training_writes_a_line_every_few_seconds_not_every_step(capsys):
    batches = itertools.repeat(([torch.zeros(1)], [{}]))
    train(_Tiny(), batches, TrainConfig(steps=300, lr=0.01, log_every=10), progress=True)
    err = capsys.readouterr().err
    updates = [part for part in err.replace("\r", "\n").split("\n") if "train" in part]
    # start and end, and at most one more per 5 s: far fewer than the 300 steps
    assert 1 <= len(updates) <= 4, updates
    assert "300/300" in updates[-1]
