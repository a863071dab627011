"""Sampling for a batch whose rows have their own settings and their own seeds.

Shapes (legend): B running rows (slots 0..B-1), V padded vocab.

Every row of the running batch belongs to a different request, so temperature, top-k, top-p, min-p and
the penalties are (B,) tensors, applied in `mambakit.generation.sampling`'s order:

    logits -> repetition penalty (prompt and output) -> frequency / presence penalties (output)
           -> greedy rows: argmax | sampled rows: temperature, top-k, top-p, min-p -> exponential race

Reproducible sampling inside a changing batch: a request's random numbers must not depend on which
other requests share its batch, or on its slot. A `torch.Generator` is one stream for the whole batch,
so instead each row draws from a counter-based generator: the uniform for (request key, step, token v)
is SplitMix64's output number step * V + v of the stream seeded by the key (the 64-bit finaliser
over key + i * golden gamma), computed for the whole (B, V) block with integer tensor ops (int64
arithmetic wraps modulo 2**64 on CPU and CUDA). The sample is argmax(p / E) with E = -log(u), an exact
draw from p (see `mambakit.generation.sampling.sample`). The same seed gives the same tokens alone or
in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`, without waiting for the device.

    `torch.tensor(values, device=cuda)` copies from pageable memory and synchronises the stream: on the
    scheduler's path that would wait for the decode block in flight, and the host's work would no longer
    overlap the device's. From pinned memory, non-blocking, the copy is queued in stream order instead.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GAMMA = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic on signed ints)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (bits as uint64, wrapping arithmetic)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


_MASK = (1 << 64) - 1


def _mix64_int(x: int) -> int:
    """`mix64` on one Python int (unsigned 64-bit arithmetic)."""
    x &= _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def request_key(seed: int, choice: int = 0) -> int:
    """The stream key (an int64) of choice `choice` of a request seeded with `seed` (any Python ints)."""
    gamma = 0x9E3779B97F4A7C15
    return _signed(_mix64_int(_mix64_int(seed * gamma + 0x632BE59BD9B4E019) + (choice + 1) * gamma))


def exponential_noise(keys_B: torch.Tensor, steps_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """E ~ Exp(1) i.i.d., (B, V) float32: row b uses number steps_B[b] * V + v of the stream keyed keys_B[b]."""
    counter_BV = steps_B[:, None] * vocab + torch.arange(vocab, device=keys_B.device)[None, :]
    z_BV = mix64(keys_B[:, None] + counter_BV * _GAMMA)
    # 53 random bits -> a double in (0, 1), never 0, so the log is finite
    u_BV = (_shr(z_BV, 11).to(torch.float64) + 0.5) * (2.0 ** -53)
    return (-torch.log(u_BV)).to(torch.float32)


@dataclass(frozen=True)
class RowParams:
    """One request's sampling settings; temperature 0 is greedy. key: its stream key (see `request_key`)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    key: int = 0


class BatchSampler:
    """Per-row sampling over the running slots, with per-slot seen-token masks and output token counts.

    The scheduler calls `set_rows` when the batch's membership changes, `reset_row` when a request joins a
    slot, `move_row` when it compacts the batch, and `sample` once per decode step.
    """

    def __init__(self, max_rows: int, vocab: int, real_vocab: int, device: torch.device):
        self.vocab, self.real_vocab, self.device = vocab, real_vocab, device
        self.seen_RV = torch.zeros(max_rows, vocab, dtype=torch.bool, device=device)
        self.counts_RV = torch.zeros(max_rows, vocab, dtype=torch.int32, device=device)
        self.rows: list[RowParams] = []

    def reset_row(self, row: int, prompt_ids: list[int], params: RowParams | None = None) -> None:
        """Slot `row` starts a request: its prompt's tokens count as seen, no output yet.

        With `params`, only what its penalties read: a row without a repetition penalty never reads its seen
        mask (the penalty 1.0 leaves every logit as it is, bit for bit) and one without frequency / presence
        penalties never reads its counts (0 * count), so a request without penalties costs no device work here.
        """
        if params is None or params.repetition_penalty != 1.0:
            self.seen_RV[row] = False
            self.seen_RV[row, to_device(prompt_ids, torch.long, self.device)] = True
        if params is None or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.counts_RV[row] = 0

    def move_row(self, src: int, dst: int, params: RowParams | None = None) -> None:
        """The masks of slot `src` go to slot `dst` (with `params`: only those its penalties read)."""
        if params is None or params.repetition_penalty != 1.0:
            self.seen_RV[dst] = self.seen_RV[src]
        if params is None or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.counts_RV[dst] = self.counts_RV[src]

    def set_rows(self, rows: list[RowParams]) -> None:
        """The settings of slots 0..B-1, in slot order."""
        self.rows = list(rows)
        dev = self.device

        def col(name, dtype=torch.float32):
            return to_device([getattr(r, name) for r in rows], dtype, dev)[:, None]

        self.greedy_B = to_device([r.temperature == 0.0 for r in rows], torch.bool, dev)
        self.all_greedy = all(r.temperature == 0.0 for r in rows)
        self.temperature_B1 = to_device([r.temperature or 1.0 for r in rows], torch.float32, dev)[:, None]
        self.top_k_B1 = col("top_k", torch.long)
        self.top_p_B1, self.min_p_B1 = col("top_p"), col("min_p")
        self.rep_B1, self.freq_B1, self.pres_B1 = col("repetition_penalty"), col("frequency_penalty"), col("presence_penalty")
        self.keys_B = to_device([r.key for r in rows], torch.int64, dev)
        self.any_rep = any(r.repetition_penalty != 1.0 for r in rows)
        self.any_freq = any(r.frequency_penalty != 0.0 or r.presence_penalty != 0.0 for r in rows)
        self.any_top_k = any(r.top_k > 0 for r in rows)
        self.any_top_p = any(r.top_p < 1.0 for r in rows)
        self.any_min_p = any(r.min_p > 0.0 for r in rows)

    @torch.inference_mode()
    def sample(self, logits_BV: torch.Tensor, steps_B: torch.Tensor) -> torch.Tensor:
        """Next token of each running row, (B,) int64; steps_B (B,) int64 counts each row's tokens so far.

        Updates the seen masks and counts with the sampled tokens while a row of the batch has a penalty that
        reads them. No host synchronisation.
        """
        B = logits_BV.shape[0]
        logits_BV = logits_BV.float()
        if self.real_vocab < self.vocab:
            logits_BV = logits_BV.clone()
            logits_BV[:, self.real_vocab:] = float("-inf")  # padded vocab ids are never produced
        if self.any_rep:
            rep = self.rep_B1
            penalised = torch.where(logits_BV > 0, logits_BV / rep, logits_BV * rep)
            logits_BV = torch.where(self.seen_RV[:B], penalised, logits_BV)
        if self.any_freq:
            counts = self.counts_RV[:B].float()
            logits_BV = logits_BV - self.freq_B1 * counts - self.pres_B1 * (counts > 0).float()
        tokens_B = torch.argmax(logits_BV, dim=-1)
        if not self.all_greedy:
            sampled_B = torch.argmax(self._probs(logits_BV) / exponential_noise(self.keys_B, steps_B, self.vocab), dim=-1)
            tokens_B = torch.where(self.greedy_B, tokens_B, sampled_B)
        # only penalties read the masks and counts; a row's settings never change while it runs, so a batch
        # without penalties skips them (a row that has penalties keeps them up to date from its join on)
        if self.any_rep:
            self.seen_RV[:B].scatter_(1, tokens_B[:, None], True)
        if self.any_freq:
            self.counts_RV[:B].scatter_add_(1, tokens_B[:, None], torch.ones_like(tokens_B, dtype=torch.int32)[:, None])
        return tokens_B

    def _probs(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """The filtered, renormalised distribution of each row (the semantics of `logits_to_probs`, per row)."""
        logits_BV = logits_BV / self.temperature_B1
        if self.any_top_k:
            sorted_BV = torch.sort(logits_BV, dim=-1, descending=True).values
            kth_B1 = sorted_BV.gather(1, (self.top_k_B1 - 1).clamp(min=0, max=self.vocab - 1))
            kth_B1 = torch.where(self.top_k_B1 > 0, kth_B1, torch.full_like(kth_B1, float("-inf")))
            logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
        probs_BV = torch.softmax(logits_BV, dim=-1)
        if self.any_top_p:
            sorted_p, order = torch.sort(probs_BV, dim=-1, descending=True)
            # drop a token when the mass strictly before it already reaches top_p
            drop_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= self.top_p_B1
            probs_BV = probs_BV.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
        if self.any_min_p:
            probs_BV = probs_BV.masked_fill(probs_BV < self.min_p_B1 * probs_BV.amax(dim=-1, keepdim=True), 0.0)
        return probs_BV / probs_BV.sum(dim=-1, keepdim=True)


def token_logprobs(logits_BV: torch.Tensor, tokens_B: torch.Tensor, real_vocab: int,
                   top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's log-probabilities (before sampling settings): of tokens_B (B,), and the `top` best (B, top) ids
    and values."""
    logp_BV = torch.log_softmax(logits_BV[:, :real_vocab].float(), dim=-1)
    chosen_B = logp_BV.gather(1, tokens_B[:, None].clamp(max=real_vocab - 1))[:, 0]
    values, ids = torch.topk(logp_BV, max(top, 1), dim=-1)
    return chosen_B, values[:, :top], ids[:, :top]
