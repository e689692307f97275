"""A pipeline part: a preset's decoder layers [first, last) as a model source of its own (``compile --gpus N``
gives each GPU one part). The part's module holds its layers under their names in the whole model, so its
weights, their values and the plan's names are the whole model's."""

from __future__ import annotations

import dataclasses

from torch import nn

from memintent.errors import MemintentError
from memintent.ir.model import ModelRef
from memintent.models import preset


class PartSource(preset.PresetSource):
    """A preset's decoder layers [first, last) (``ModelConfig.part``), its weights filled exactly as the whole
    model's (same names, same values)."""

    def __init__(self, src: preset.PresetSource, first: int, last: int):
        if not isinstance(src, preset.PresetSource):
            raise MemintentError(f"{src.ref}: pipeline parts are built from presets (the project's model code "
                                 "splits at any layer); compile an hf: folder for one GPU")
        super().__init__(src.ref, src.config, src.seed)
        self.first, self.last = first, last
        self.num_layers = last - first
        self.takes_hidden = first > 0

    def build(self, device="meta", num_layers: int | None = None, attention: str | None = None) -> nn.Module:
        cfg = self.config
        last = self.last if num_layers is None else self.first + num_layers
        # A smaller build (the front end traces two layers and folds) keeps the part's ends: the head if it has it.
        n = cfg.n_layers if self.last < cfg.n_layers else last
        return preset.build(dataclasses.replace(cfg, n_layers=n, part=(self.first, last)), device
                            ).requires_grad_(False)

    def model_ref(self, traced_layers: int | None = None, attention: str | None = None) -> ModelRef:
        return super().model_ref(traced_layers, attention).model_copy(update={"part": [self.first, self.last]})


def part_of(src, part: list[int]):
    """The source a part's plan names: ``src`` itself, or its layers ``part`` = [first, last)."""
    return PartSource(src, *part) if part else src


__all__ = ["PartSource", "part_of"]
