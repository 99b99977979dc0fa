"""Where the cached states live: one flat array of variable-length rows, in RAM or memory-mapped."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import numpy as np
import torch

from progtuning.errors import ProgtuningError

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.float64: np.float64}


class StateStore:
    """Per-example variable-length rows of width ``hidden`` in one flat array (RAM or memmap)."""

    def __init__(self, lengths: np.ndarray, hidden: int, dtype: torch.dtype, budget_mb: float, folder: str | None, storage: str):
        if dtype not in _NUMPY_DTYPES:
            raise ProgtuningError(f"the frozen-prefix cache cannot store {dtype}: use float32, float16 or bfloat16")
        self.dtype = dtype
        self.hidden = hidden
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        np_dtype = _NUMPY_DTYPES[dtype]
        shape = (int(self.offsets[-1]), hidden)
        self.nbytes = shape[0] * shape[1] * np.dtype(np_dtype).itemsize
        use_memmap = storage == "memmap" or (storage == "auto" and self.nbytes > budget_mb * 2**20)
        self.path: str | None = None
        self._tempdir: str | None = None
        if use_memmap:
            if folder is None:
                folder = self._tempdir = tempfile.mkdtemp(prefix="progtuning-prefix-cache-")
            os.makedirs(folder, exist_ok=True)
            self.path = os.path.join(folder, f"prefix-cache-{os.getpid()}-{id(self):x}.bin")
            self.array = np.memmap(self.path, dtype=np_dtype, mode="w+", shape=shape)
        else:
            self.array = np.zeros(shape, dtype=np_dtype)
        self.kind = "memmap" if use_memmap else "memory"
        self._finalizer = weakref.finalize(self, _remove_files, self.path, self._tempdir)

    def row(self, i: int) -> torch.Tensor:
        view = torch.from_numpy(self.array[self.offsets[i] : self.offsets[i + 1]])
        return view.view(torch.bfloat16) if self.dtype == torch.bfloat16 else view

    def write(self, i: int, states: torch.Tensor) -> None:
        states = states.detach().to("cpu", self.dtype)
        if self.dtype == torch.bfloat16:
            states = states.view(torch.int16)
        self.array[self.offsets[i] : self.offsets[i + 1]] = states.numpy()

    def flush(self) -> None:
        if isinstance(self.array, np.memmap):
            self.array.flush()

    def close(self) -> None:
        self.array = None
        self._finalizer()


def _remove_files(path: str | None, tempdir: str | None) -> None:
    if path and os.path.exists(path):
        os.remove(path)
    if tempdir:
        shutil.rmtree(tempdir, ignore_errors=True)
