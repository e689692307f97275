"""How the parts of a pipeline reach each other: hidden states down the parts, sampled tokens back to every rank.

``LocalLink``: every part in this process (hidden states wait in a queue per receiving part); one GPU is a pipeline
of one part over a ``LocalLink``. ``DistLink``: one part per rank of the default process group (``torchrun``;
gloo on the CPU, NCCL on CUDA).
"""

from __future__ import annotations

import collections
import os

import torch
import torch.distributed as dist

from memintent.errors import MemintentError


class LocalLink:
    """Every part in this process: hidden states wait in a queue per receiving part."""

    rank, world = 0, 1

    def __init__(self):
        self._boxes: dict[int, collections.deque] = collections.defaultdict(collections.deque)

    def parts(self, n: int) -> range:
        return range(n)

    def send(self, part: int, hidden: torch.Tensor) -> None:
        self._boxes[part + 1].append(hidden)

    def recv(self, part: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._boxes[part].popleft()

    def tokens(self, tokens: list[int] | None, n: int) -> list[int]:
        return tokens

    def flush(self) -> None:
        """Nothing in flight."""


class DistLink:
    """One part per rank of the default process group (``torchrun``; gloo on the CPU, NCCL on CUDA). Sends are
    non-blocking (a rank goes on to the tick's broadcast while its activations travel) and waited on before the
    next tick's send reuses nothing of theirs."""

    def __init__(self, device: torch.device):
        self.dist, self.device = dist, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._sends: list = []

    def parts(self, n: int) -> range:
        if n != self.world:
            raise MemintentError(f"the pipeline has {n} parts but {self.world} processes were started: start "
                                 f"one per part (torchrun --nproc-per-node {n})")
        return range(self.rank, self.rank + 1)

    def send(self, part: int, hidden: torch.Tensor) -> None:
        self.flush()
        self._sends.append((self.dist.isend(hidden.contiguous(), part + 1), hidden))   # keep it alive in flight

    def recv(self, part: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        self.dist.recv(t, part - 1)
        return t

    def tokens(self, tokens: list[int] | None, n: int) -> list[int]:
        """The last part's ``n`` sampled tokens, on every rank."""
        t = (torch.tensor(tokens, dtype=torch.long) if tokens is not None
             else torch.empty(n, dtype=torch.long)).to(self.device)
        self.dist.broadcast(t, src=self.world - 1)
        return t.tolist()

    def flush(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()


def rank_device(device: torch.device) -> torch.device:
    """The device this process serves on: under torchrun with several processes on CUDA, its own GPU
    (``LOCAL_RANK``), made current; else ``device``."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def link_from_env(device: torch.device):
    """A ``DistLink`` when this process was started as one of several (WORLD_SIZE > 1), else a ``LocalLink``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return LocalLink()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistLink(device)


__all__ = ["DistLink", "LocalLink", "link_from_env", "rank_device"]
