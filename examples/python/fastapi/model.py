"""The FastAPI example's model: a plain ``nn.Module`` (a small MLP classifier), and the script
that writes its weights file.

    python examples/python/fastapi/model.py OUT.safetensors   # seeded, so always the same bytes

The app builds it under ``torch.device("meta")`` (no memory, no compute) and binds the shared
weights in every worker.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

IN, HIDDEN, CLASSES = 16, 64, 4


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(IN, HIDDEN)
        self.out = nn.Linear(HIDDEN, CLASSES)
        # A non-persistent buffer computed from the config, as position_ids are in BERT.
        self.register_buffer("scale", torch.full((IN,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x * self.scale)))


def write(path: str) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = Classifier()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else "classifier.safetensors")
