"""Packed documents: where a window of the token stream crosses a document boundary, the state restarts.

Shapes:
    batch, seqlen   windows of a stream; a window holds seqlen + 1 tokens (inputs and targets overlap)

A stream is EOS doc_1 EOS doc_2 ... (see stream.py): each document is preceded by the tokenizer's
end-of-document token. A random window therefore holds the tail of one document, a separator, the
head of the next, and so on. Without a reset the recurrent state carries the previous document into
the next one; with `seq_idx` the mixers (selective scan, SSD, causal conv, attention) restart from
zero at every input position that holds the separator, so the separator is the first token of its
document, as it is when a prompt is generated from (EOS + prompt, empty state):

    inputs    a  b  EOS c  d  EOS e
    seq_idx   0  0  1   1  1  2   2

Targets are not split: the prediction of EOS at the end of a document still reads that document
(it is the model saying "the document ends here"), and the prediction of a document's first token
reads only the separator. Packing with `seq_idx` gives each document exactly the logits it gets
when run alone from an empty state (tests/test_data_scale.py checks this for both layers).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["IGNORE_INDEX", "WindowBatch", "seq_idx_from_eos", "split_window"]


class WindowBatch(NamedTuple):
    """One batch of windows as the model reads it: inputs, targets and, for packed documents, seq_idx.

    inputs, targets: (batch, seqlen) int64; seq_idx: (batch, seqlen) int32 or None (no resets).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    seq_idx: torch.Tensor | None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> WindowBatch:
        return WindowBatch(self.inputs.to(device, non_blocking=non_blocking),
                           self.targets.to(device, non_blocking=non_blocking),
                           None if self.seq_idx is None else self.seq_idx.to(device, non_blocking=non_blocking))


def seq_idx_from_eos(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document index of every position: it increases by one at each `eos_id` (a new document starts there).

    Args:
        input_ids: (batch, seqlen) integer token ids.
        eos_id: the end-of-document token that precedes every document of the stream.
    Returns:
        (batch, seqlen) int32, nondecreasing along each row, 0 before the row's first separator.

    Example:
        >>> seq_idx_from_eos(torch.tensor([[5, 6, 0, 7, 0, 8]]), eos_id=0)
        tensor([[0, 0, 1, 1, 2, 2]], dtype=torch.int32)
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"seq_idx_from_eos: input_ids must be an integer tensor (batch, seqlen), got "
                         f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
    # int32 is what the ops take; a row never holds 2**31 documents
    return torch.cumsum(input_ids == eos_id, dim=1, dtype=torch.int32)


IGNORE_INDEX = -100  # a target that is not scored (cross_entropy's default ignore_index)


def split_window(window: torch.Tensor, eos_id: int | None, scored: torch.Tensor | None = None,
                 starts: torch.Tensor | None = None) -> WindowBatch:
    """(batch, seqlen + 1) windows -> inputs, targets and the seq_idx that resets the state at each `eos_id`.

    `eos_id=None` (a tokenizer without an end-of-document token, or resets turned off) gives seq_idx None:
    the state runs across document boundaries.

    A conversation stream (data.conversations) gives two (batch, seqlen + 1) bool masks of the window's tokens:
    `scored` (the assistant's tokens) turns every target it does not mark into IGNORE_INDEX, and `starts` (where a
    conversation begins) makes the seq_idx instead of `eos_id`: the state restarts at each conversation's first
    token, and an end-of-document token inside a conversation (a template's bos text) is read as any other.

    Example:
        >>> b = split_window(torch.tensor([[4, 0, 5, 6]]), eos_id=0)
        >>> b.inputs.tolist(), b.targets.tolist(), b.seq_idx.tolist()
        ([[4, 0, 5]], [[0, 5, 6]], [[0, 1, 1]])
    """
    if window.dim() != 2 or window.shape[1] < 2:
        raise ValueError(f"split_window: window must be (batch, seqlen + 1) with seqlen >= 1, "
                         f"got {tuple(window.shape)}")
    inputs, targets = window[:, :-1], window[:, 1:]  # (batch, seqlen) each
    for name, mask in (("scored", scored), ("starts", starts)):
        if mask is not None and mask.shape != window.shape:
            raise ValueError(f"split_window: {name} must have the window's shape {tuple(window.shape)}, "
                             f"got {tuple(mask.shape)}")
    if scored is not None:
        targets = targets.masked_fill(~scored[:, 1:], IGNORE_INDEX)
    if starts is not None:
        return WindowBatch(inputs, targets, torch.cumsum(starts[:, :-1], dim=1, dtype=torch.int32))
    return WindowBatch(inputs, targets, None if eos_id is None else seq_idx_from_eos(inputs, eos_id))
