"""A deterministic, resumable, rank-sharded batch sampler.

Batch c (counting micro-batches from 0 over the whole run) is a pure function of (seed, c, rank), so
resuming at micro-batch c reproduces exactly the data an uninterrupted run would have seen, without
replaying the data loader. Each epoch is a fresh permutation drawn from `default_rng([seed, epoch])`;
the samples of the last incomplete optimizer step of an epoch are dropped, so every rank sees the same
number of batches and an epoch ends between optimizer steps.

Equivalence across process counts and accumulation: optimizer step s consumes the slice
perm[s * S : (s + 1) * S] of the epoch's permutation, S = batch_size x world_size x grad_accum, and the
(micro-batch, rank) pairs of that step take disjoint consecutive pieces of it. So a run with P processes
and A accumulation steps sees exactly the samples, step by step, of one process with a batch of
batch_size x P x A (tests/test_train_parts.py, tests/test_train_distributed.py).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        indices: np.ndarray,
        batch_size: int,
        seed: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_batches: int | None = None,
        grad_accum: int = 1,
    ):
        """`indices`: the dataset positions to draw from (e.g. the training split); `batch_size` per rank.

        `num_batches`: stop after this many batches (counted from 0, not from start_batch); None = endless.
        `grad_accum`: micro-batches per optimizer step (epochs end between optimizer steps).
        """
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size
        self.num_batches = num_batches
        self.grad_accum = grad_accum
        self.global_batch = batch_size * world_size
        step_samples = self.global_batch * grad_accum
        if len(self.indices) < step_samples:
            from vla_core.utils import WmvlaError

            raise WmvlaError(
                f"the training split has {len(self.indices)} samples, fewer than one optimizer step "
                f"({batch_size} x {world_size} ranks x {grad_accum} accumulation steps); lower "
                "--optim.batch-size / --optim.grad-accum or use more data"
            )
        # micro-batches per epoch, a multiple of grad_accum
        self.batches_per_epoch = (len(self.indices) // step_samples) * grad_accum
        self._perm_epoch, self._perm = -1, None

    def batch(self, c: int) -> list[int]:
        """The sample positions of micro-batch `c` for this rank."""
        epoch, j = divmod(c, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            self._perm_epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
        perm = self._perm
        lo = j * self.global_batch + self.rank * self.batch_size
        return self.indices[perm[lo : lo + self.batch_size]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        c = self.start_batch
        while self.num_batches is None or c < self.num_batches:
            yield self.batch(c)
            c += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("endless sampler has no length")
        return max(0, self.num_batches - self.start_batch)
