"""How the bench measures memory: saved activations, optimizer state, weights, and peak RSS over one step."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

import psutil
import torch
from torch import nn


def init_adam_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Create AdamW's moments without moving any weight (lr 0, zero gradients, no weight decay)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def module_mb(model: nn.Module) -> float:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


def optimizer_mb(optimizer: torch.optim.Optimizer) -> float:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total / 2**20


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Counts the tensors autograd saves for backward (unique storages): the activation memory."""

    def __init__(self, weights: set[int]) -> None:
        self.count = 0
        self.nbytes = 0
        self._seen: set[int] = set(weights)  # weights are counted as weights, not activations
        super().__init__(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._seen:
                self.count += 1
                self._seen.add(ptr)
                self.nbytes += storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return tensor


def rss() -> int:
    return psutil.Process().memory_info().rss


class PeakSampler:
    """Samples this process's resident memory every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def return_freed_memory_at_once() -> None:
    """glibc: allocate large blocks with mmap and trim the heap, so RSS follows live memory."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return
    if hasattr(libc, "mallopt"):
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also stops its dynamic growth)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
