"""Image samples stored as uint8 and normalized per batch on the device, in memory or streamed.

Float32 is four bytes a pixel, uint8 one: a folder of 100,000 RGB images at 128x128 is 19.7 GB
as float32 and 4.9 GB as uint8. So 8-bit images are kept as they were decoded, (N, C, H, W)
uint8, and a batch is normalized when it is taken, `(pixels / scale - mean[c]) / std[c]` in
float32: the same operations, in the same order, as the float32 path of `nas.data.datasets.load_dataset`
(divide, subtract, divide, each rounded to float32), so the values are equal bit for bit. Every
operand is a tensor on the device: CUDA divides by a Python scalar as a multiplication by its
reciprocal, which rounds differently. Where even uint8 does not fit the device, `StreamedImages` reads each
batch from the host array (the memory-mapped decode cache) and a background thread reads the
next batches while the current one trains.

Both read like the normalized float32 tensor they stand for where the trainers read it:
`x[index]`, `len(x)`, `x.shape`, `x.tensor_split(n)` (lazily, chunk by chunk), and
`x.cpu()` / `x.float()` for the whole normalized split. `rows(x, index)` takes a subset without
normalizing it (a validation fold), and `loaded(x, index_batches)` yields batches, prefetched
when streamed. Plain tensors pass through both.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import torch

PREFETCH = 2  # batches read ahead of the one training


class CompactImages:
    """uint8 images (N, C, H, W) on the device, normalized per batch."""

    dtype = torch.float32  # what indexing gives

    def __init__(self, pixels: torch.Tensor, scale: float, mean: torch.Tensor, std: torch.Tensor):
        self.pixels = pixels
        self._statistics(scale, mean, std, pixels.dim(), pixels.device)

    def _statistics(self, scale: float, mean: torch.Tensor, std: torch.Tensor, dims: int, device) -> None:
        view = (-1,) + (1,) * (dims - 2)  # (C, 1, 1): broadcasts over a sample, a batch, or folds of batches
        self.scale = float(scale)
        self.mean = mean.reshape(view).to(torch.float32).to(device)
        self.std = std.reshape(view).to(torch.float32).to(device)
        self.divisor = torch.full_like(self.mean, self.scale)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(self.mean.device, torch.float32).div_(self.divisor).sub_(self.mean).div_(self.std)

    def __getitem__(self, index) -> torch.Tensor:
        return self.normalize(self.pixels[index])

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()

    def subset(self, index: torch.Tensor) -> CompactImages:
        return CompactImages(self.pixels[index.to(self.pixels.device)], self.scale, self.mean, self.std)

    def tensor_split(self, sections: int) -> Iterator[torch.Tensor]:
        return (self.normalize(part) for part in self.pixels.tensor_split(sections))

    def to(self, device: torch.device | str) -> CompactImages:
        return CompactImages(self.pixels.to(device), self.scale, self.mean.to(device), self.std.to(device))

    def cpu(self) -> torch.Tensor:
        return self.to("cpu").float()

    def float(self) -> torch.Tensor:
        return self.normalize(self.pixels)

    def dim(self) -> int:
        return self.pixels.dim()


class StreamedImages(CompactImages):
    """uint8 images in host memory (a NumPy array, usually the memory-mapped cache), batches copied to the
    device when taken: pinned and non-blocking on CUDA."""

    def __init__(
        self, pixels: np.ndarray, scale: float, mean: torch.Tensor, std: torch.Tensor, device: torch.device | str
    ):
        self.host, self.target = pixels, torch.device(device)
        self._statistics(scale, mean, std, pixels.ndim, self.target)

    @property
    def pixels(self) -> torch.Tensor:  # only for what needs the whole split (cpu(), float()): read all of it
        return torch.from_numpy(np.array(self.host))  # a copy: the memory map is read-only

    def read(self, index) -> torch.Tensor:
        """The raw uint8 rows at `index` (an int tensor of any shape, or a slice), on the device."""
        if isinstance(index, slice):
            block = torch.from_numpy(np.array(self.host[index]))
        else:
            flat = index.reshape(-1).cpu().numpy()
            order = np.argsort(flat, kind="stable")  # ascending reads: the memory map is read in file order
            block = torch.empty((len(flat), *self.host.shape[1:]), dtype=torch.uint8)
            block[torch.from_numpy(order)] = torch.from_numpy(self.host[flat[order]])
            block = block.reshape(*index.shape, *self.host.shape[1:])
        if self.target.type == "cuda":
            return block.pin_memory().to(self.target, non_blocking=True)
        return block

    def __getitem__(self, index) -> torch.Tensor:
        return self.normalize(self.read(index))

    def __len__(self) -> int:
        return len(self.host)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.host.shape)

    @property
    def nbytes(self) -> int:
        return int(self.host.nbytes)

    def subset(self, index: torch.Tensor) -> StreamedSubset:
        return StreamedSubset(self, index.reshape(-1).cpu())

    def tensor_split(self, sections: int) -> Iterator[torch.Tensor]:
        bounds = np.linspace(0, len(self), sections + 1).round().astype(int) if sections else [0, 0]
        return (self[slice(a, b)] for a, b in zip(bounds[:-1], bounds[1:]))

    def to(self, device: torch.device | str) -> StreamedImages:
        return StreamedImages(self.host, self.scale, self.mean, self.std, device)

    def cpu(self) -> torch.Tensor:
        return self.normalize(self.pixels.to(self.target)).cpu()

    def float(self) -> torch.Tensor:
        return self.normalize(self.pixels.to(self.target))

    def dim(self) -> int:
        return self.host.ndim


class StreamedSubset:
    """Some rows of a `StreamedImages` (a validation fold), read chunk by chunk when evaluated."""

    def __init__(self, source: StreamedImages, index: torch.Tensor):
        self.source, self.index = source, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index) -> torch.Tensor:
        return self.source[self.index[index]]

    def tensor_split(self, sections: int) -> Iterator[torch.Tensor]:
        return (self.source[part] for part in self.index.tensor_split(sections))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.source.shape[1:]))

    def dim(self) -> int:
        return len(self.shape)


def rows(x, index: torch.Tensor):
    """`x[index]` for a tensor; for stored images a subset that is normalized only when read."""
    return x.subset(index) if isinstance(x, CompactImages) else x[index]


def loaded(x, index_batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(index, x[index]) for each index batch in order; read `PREFETCH` batches ahead by a thread when streamed."""
    if not isinstance(x, StreamedImages):
        for index in index_batches:
            yield index, x[index]
        return
    ahead: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()

    def read_ahead() -> None:
        try:
            for index in index_batches:
                if stop.is_set():
                    return
                ahead.put((index, x.read(index)))
        except BaseException as exc:  # handed to the consumer, which raises it
            ahead.put(exc)
            return
        ahead.put(None)

    reader = threading.Thread(target=read_ahead, name="bnnas-prefetch", daemon=True)
    reader.start()
    try:
        while (item := ahead.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            index, pixels = item
            yield index, x.normalize(pixels)
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue, then let it end
            try:
                ahead.get_nowait()
            except queue.Empty:
                pass
            reader.join(timeout=0.05)
