"""Training batches: every pair from its own seed, prepared ahead of the training loop by worker threads.

Pair ``i`` of step ``k`` is drawn by ``data.pair(generator)`` with a generator seeded from
``(train.seed, k, i)``; the batch of step ``k`` on rank ``r`` of ``N`` holds pairs ``r·B .. r·B + B - 1``
of the global batch of ``N·B``. A batch depends on nothing else, which gives:

- resuming at step ``k`` needs no random state of the data;
- ``N`` processes draw disjoint parts of one global batch, each only its own part, so ``N``
  processes with batch ``B`` see the pairs one process sees with batch ``N·B``;
- worker threads can prepare batches in any order with the same result. Augmentation runs in
  PyTorch operators, which release Python's lock, so the workers overlap the training step.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["pair_seed", "make_batch", "Loader"]


def pair_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for pair ``index`` of step ``step`` (NumPy's SeedSequence hashing: well mixed)."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def make_batch(data, seed: int, step: int, indices) -> tuple[torch.Tensor, ...]:
    """The pairs ``indices`` of step ``step``, as ``(moving, fixed)`` batches (and whatever else a pair
    carries, such as label maps, batched the same way)."""
    pairs = [data.pair(torch.Generator().manual_seed(pair_seed(seed, step, i))) for i in indices]
    return tuple(torch.cat(parts) for parts in zip(*pairs))


class Loader:
    """Batches of steps ``start, start + 1, ...`` for one rank, ``ahead`` of them in preparation by
    ``workers`` threads (``workers = 0``: prepared in the caller, when asked for). ``wait`` holds the
    seconds the last :meth:`next` spent waiting for its batch."""

    def __init__(self, data, seed: int, batch_size: int, rank: int, world: int, start: int, total: int,
                 workers: int = 2, ahead: int = 4):
        self.data, self.seed, self.total = data, seed, total
        self.indices = range(rank * batch_size, (rank + 1) * batch_size)
        self.step = start
        self.wait = 0.0
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="cyclereg-data") if workers > 0 else None
        self.pending: dict[int, Future] = {}
        self.ahead = max(1, ahead)
        self._fill()

    def _make(self, step: int):
        return make_batch(self.data, self.seed, step, self.indices)

    def _fill(self) -> None:
        if self.pool is None:
            return
        for step in range(self.step, min(self.step + self.ahead, self.total)):
            if step not in self.pending:
                self.pending[step] = self.pool.submit(self._make, step)

    def next(self) -> tuple[torch.Tensor, ...]:
        t0 = time.perf_counter()
        step = self.step
        batch = self.pending.pop(step).result() if step in self.pending else self._make(step)
        self.wait = time.perf_counter() - t0
        self.step += 1
        self._fill()
        return batch

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending.values():
                future.cancel()
            self.pool.shutdown(wait=True)
            self.pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
