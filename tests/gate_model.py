"""A tiny model for the regression-gate tests: ``MEMPROF_TEST_GROW=1`` makes one block wider.

Used as the MODEL spec ``tests.gate_model:build`` (a ``module:factory``): the
environment variable stands for a code change between the baseline and the check.
"""

from __future__ import annotations

import os

import torch


class Block(torch.nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        grow = os.environ.get("MEMPROF_TEST_GROW") == "1"
        self.blocks = torch.nn.ModuleList([Block(32, 64), Block(32, 256 if grow else 64), Block(32, 64)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x.pow(2).mean()

    def example_inputs(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(batch_size, seq_len, 32)}


def build() -> Net:
    return Net()
