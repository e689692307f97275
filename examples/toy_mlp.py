"""A toy model for ``py:`` references. From the repository root:

    memintent compile py:examples/toy_mlp.py:mlp_stack --hw cpu --budget 600KiB -o toy.plan.json
    memintent run toy.plan.json --device cpu --allow-code --verify

``compile`` imports and runs the factory you name on its command line. ``run`` (and ``generate``) run the model a
plan file names, and a plan file may come from anyone: a plan naming a ``py:`` factory runs only with
``--allow-code``. A factory returns ``(module, example_inputs)``; ``run`` feeds it those inputs. The decoder-layer
analogue here is the ModuleList ``layers``.
"""

import torch
from torch import nn


class MLPStack(nn.Module):
    def __init__(self, dim: int = 256, n_layers: int = 6, n_out: int = 10):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for _ in range(n_layers))
        self.head = nn.Linear(dim, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)  # (B, dim)
        return self.head(x)  # (B, n_out)


def mlp_stack():
    torch.manual_seed(0)
    model = MLPStack()
    return model, (torch.randn(4, 256),)
