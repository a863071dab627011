"""Synthetic tasks of the Mamba papers, generated on the fly from a seed: selective copying, induction heads, MQAR.

Every generator takes a `torch.Generator` (or a seed) and returns a `SyntheticBatch`: `inputs` (B, T) int64
token ids and `targets` (B, T) int64 holding the target of the logits at each position, IGNORE (-100, the
`ignore_index` of `F.cross_entropy`) where nothing is scored. Rows are drawn on the CPU (the same numbers on
every machine for a given seed), then moved to `device`. Accuracy = the share of scored positions where
argmax(logits) equals the target.

Selective copying (Mamba paper, Section 4.1.1; Table 1). Vocabulary 18: id 0 = noise, ids 1..16 =
content, id 17 = marker. A row is L tokens of noise holding n_tokens = 16 content tokens (each uniform in
1..16, with repetition) at 16 distinct uniformly random positions of [0, L), in that order, followed by 16
markers: length L + 16. The k-th content token (in position order) is the target of the logits at the k-th
marker position, L + k.

Induction heads (Mamba paper, Section 4.1.2; Table 2; Olsson et al. 2022). Vocabulary 17: ids 0..15 =
content, id 16 = trigger. A row of length T holds uniform content tokens, except one trigger at a position
p uniform in [0, T - 3], followed at p + 1 by the target v (a uniform content token), and a trigger as the
last token (position T - 1). The target of the logits at position T - 1 is v.

Multi-query associative recall, MQAR (Arora et al. 2023, "Zoology", Section 3; Mamba-2 paper, Section 9.1).
Vocabulary V (even, default 8192): id 0 = filler; keys are ids 1 .. V/2 - 1, values ids V/2 .. V - 1.
A row of length T starts with K key-value pairs k_1 v_1 ... k_K v_K (2K tokens; the K keys distinct, drawn
uniformly without replacement; each value uniform, repetitions allowed). The remaining T - 2K positions
hold filler 0 except the K queries: every key exactly once, in uniformly random order, placed at K distinct
positions chosen uniformly among the even offsets 0, 2, 4, ... of that region (so a query is never
followed directly by another query). The target of the logits at a query's position is the value paired
with that key. Needs T >= 4K. (Zoology draws the query offsets from a power law favouring short gaps;
here they are uniform, which is the harder and simpler-to-state choice.)

Example:
    >>> batch = induction_heads(8, seqlen=256, generator=torch.Generator().manual_seed(0))
    >>> batch.inputs.shape, int(batch.targets[0, -1]) in range(16)
    (torch.Size([8, 256]), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100

SELECTIVE_COPYING_VOCAB = 18
SC_NOISE, SC_MARKER = 0, 17
SC_CONTENT = range(1, 17)

INDUCTION_VOCAB = 17
IH_TRIGGER = 16

MQAR_FILLER = 0


@dataclass
class SyntheticBatch:
    """inputs (B, T) int64 ids; targets (B, T) int64, IGNORE where nothing is scored."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def to(self, device) -> "SyntheticBatch":
        return SyntheticBatch(self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True))

    @property
    def scored(self) -> torch.Tensor:
        """(B, T) bool: the positions with a target."""
        return self.targets != IGNORE


def _generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"synthetic data is drawn on the CPU: generator must be a CPU generator, "
                             f"got one on {generator.device}")
        return generator
    if generator is None:
        return torch.Generator().manual_seed(torch.seed())
    return torch.Generator().manual_seed(int(generator))


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _distinct_positions(batch: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, k) sorted distinct positions uniform in [0, n): the k smallest of n uniform keys per row."""
    return torch.rand(batch, n, generator=gen).topk(k, dim=1, largest=False).indices.sort(dim=1).values


def selective_copying(batch_size: int, seqlen: int = 4096, n_tokens: int = 16,
                      generator: torch.Generator | int | None = None, device=None) -> SyntheticBatch:
    """Selective-copying rows (see the module docstring): inputs, targets (batch_size, seqlen + n_tokens).

    seqlen: L, the noise region holding the content tokens (>= n_tokens). n_tokens: 16 in the paper (the
    vocabulary stays 18 whatever n_tokens is).

    Example:
        >>> b = selective_copying(4, seqlen=64, generator=0)
        >>> b.inputs.shape, bool((b.inputs[:, 64:] == SC_MARKER).all())
        (torch.Size([4, 80]), True)
    """
    _check_positive("selective_copying: batch_size", batch_size)
    _check_positive("selective_copying: n_tokens", n_tokens)
    if not isinstance(seqlen, int) or seqlen < n_tokens:
        raise ValueError(f"selective_copying: seqlen must be an int >= n_tokens ({n_tokens}), got {seqlen!r}")
    gen = _generator(generator)
    content = torch.randint(SC_CONTENT.start, SC_CONTENT.stop, (batch_size, n_tokens), generator=gen)
    positions = _distinct_positions(batch_size, seqlen, n_tokens, gen)  # (B, n) increasing
    inputs = torch.full((batch_size, seqlen + n_tokens), SC_NOISE, dtype=torch.long)
    inputs.scatter_(1, positions, content)
    inputs[:, seqlen:] = SC_MARKER
    targets = torch.full_like(inputs, IGNORE)
    targets[:, seqlen:] = content
    return SyntheticBatch(inputs, targets).to(device) if device is not None else SyntheticBatch(inputs, targets)


def induction_heads(batch_size: int, seqlen: int = 256, generator: torch.Generator | int | None = None,
                    device=None) -> SyntheticBatch:
    """Induction-head rows (see the module docstring): inputs, targets (batch_size, seqlen); one target per row.

    Example:
        >>> b = induction_heads(4, seqlen=64, generator=0)
        >>> bool((b.inputs[:, -1] == IH_TRIGGER).all()), int(b.scored.sum())
        (True, 4)
    """
    _check_positive("induction_heads: batch_size", batch_size)
    if not isinstance(seqlen, int) or seqlen < 3:
        raise ValueError(f"induction_heads: seqlen must be an int >= 3, got {seqlen!r}")
    gen = _generator(generator)
    inputs = torch.randint(0, IH_TRIGGER, (batch_size, seqlen), generator=gen)
    p = torch.randint(0, seqlen - 2, (batch_size, 1), generator=gen)  # uniform in [0, T - 3]
    value = torch.randint(0, IH_TRIGGER, (batch_size, 1), generator=gen)
    inputs.scatter_(1, p, IH_TRIGGER)
    inputs.scatter_(1, p + 1, value)
    inputs[:, -1] = IH_TRIGGER
    targets = torch.full_like(inputs, IGNORE)
    targets[:, -1:] = value
    return SyntheticBatch(inputs, targets).to(device) if device is not None else SyntheticBatch(inputs, targets)


def mqar(batch_size: int, seqlen: int = 256, num_kv_pairs: int = 32, vocab_size: int = 8192,
         generator: torch.Generator | int | None = None, device=None) -> SyntheticBatch:
    """MQAR rows (see the module docstring): inputs, targets (batch_size, seqlen); num_kv_pairs targets per row.

    Example:
        >>> b = mqar(4, seqlen=64, num_kv_pairs=8, vocab_size=64, generator=0)
        >>> b.inputs.shape, int(b.scored.sum())
        (torch.Size([4, 64]), 32)
    """
    _check_positive("mqar: batch_size", batch_size)
    _check_positive("mqar: num_kv_pairs", num_kv_pairs)
    if not isinstance(vocab_size, int) or vocab_size % 2 or vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"mqar: vocab_size must be even with vocab_size / 2 - 1 >= num_kv_pairs ({num_kv_pairs}) "
                         f"distinct keys, got {vocab_size!r}")
    if not isinstance(seqlen, int) or seqlen < 4 * num_kv_pairs:
        raise ValueError(f"mqar: seqlen must be an int >= 4 * num_kv_pairs = {4 * num_kv_pairs}, got {seqlen!r}")
    gen = _generator(generator)
    K, half = num_kv_pairs, vocab_size // 2
    keys = torch.rand(batch_size, half - 1, generator=gen).topk(K, dim=1).indices + 1  # distinct, in 1 .. V/2 - 1
    values = torch.randint(half, vocab_size, (batch_size, K), generator=gen)
    inputs = torch.full((batch_size, seqlen), MQAR_FILLER, dtype=torch.long)
    inputs[:, 0:2 * K:2] = keys
    inputs[:, 1:2 * K:2] = values
    region = seqlen - 2 * K
    slots = _distinct_positions(batch_size, (region + 1) // 2, K, gen)  # even offsets of the query region
    slots = slots.gather(1, torch.rand(batch_size, K, generator=gen).argsort(dim=1))  # queries in random order
    query_pos = 2 * K + 2 * slots  # (B, K): query j asks for key j
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full_like(inputs, IGNORE)
    targets.scatter_(1, query_pos, values)
    return SyntheticBatch(inputs, targets).to(device) if device is not None else SyntheticBatch(inputs, targets)
