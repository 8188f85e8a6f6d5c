"""Random streams keyed by what they are for, so that a run's randomness does not depend on how its work is
split: over ranks (DDP/FSDP), over forward chunks (``rollout_batch_size``), or over resumptions.

An iteration has two generators seeded by ``(seed, iteration)``, identical on every rank: one for drawing
the batch and rolling it out, one for training (timesteps, minibatch order). Anything drawn *per sample*
or *per group* comes from a generator of its own, derived from one of those and the sample's (or group's)
index in the iteration's global batch::

    sample i:  keyed(generator, [i], SAMPLE)       its initial noise, then its SDE noise step after step
    group g:   keyed(generator, [g], GROUP)        a group's shared initial noise (DanceGRPO, G2RPO anchors)

So sample 5 gets the same noise whether it is rolled out in a batch of 8 or of 2, on rank 0 of 1 or rank
1 of 2. Drawing from many small generators costs one ``randn`` per sample instead of one per batch, which
is small beside a denoiser forward.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SAMPLE = 0  # per-sample noise: initial latents, SDE steps
GROUP = 1  # per-group noise: shared initial latents, DGPO's eps per group
CHOICE = 2  # per-sample discrete choices: DanceGRPO's trained steps, DGPO's text dropout
TOKEN = 3  # per-sample token sampling (token policies: answers, image codes)
PROBE = 4  # a curriculum's pre-rollouts of a token policy (CurES), apart from the training samples' draws


def seeded(*key: int) -> torch.Generator:
    """A CPU generator seeded by a well-mixed hash of ``key`` (numpy's ``SeedSequence``)."""
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0])
    )


def iteration_generator(seed: int, iteration: int, *stream: int) -> torch.Generator:
    """One of an iteration's generators, identical on every rank: ``(seed, iteration)`` draws the batch and
    rolls it out, ``(seed, iteration, 0)`` trains."""
    return seeded(seed, iteration, *stream)


def keyed(
    generator: torch.Generator, keys: Tensor | list[int], stream: int = SAMPLE
) -> list[torch.Generator]:
    """One CPU generator per key, seeded by a well-mixed hash of ``(generator's seed, stream, key)``.

    Only the generator's *seed* is used, not its state, so the streams do not depend on what was drawn
    from it before.
    """
    base = generator.initial_seed()
    keys = keys.tolist() if isinstance(keys, Tensor) else list(keys)
    return [seeded(base, stream, int(key)) for key in keys]


def rand_per_key(generators: list[torch.Generator], *shape: int) -> Tensor:
    """``U[0, 1)`` draws of ``shape`` from each generator, stacked: ``[len(generators), *shape]``."""
    return torch.stack([torch.rand(shape, generator=g) for g in generators])
