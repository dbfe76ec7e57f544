"""Chunk size of the torch backend, sized from every temporary a chunk holds (SPEC §6).

The fused call's extra memory beyond the gradients themselves must stay within
:data:`EXTRA_BUDGET_BYTES` whatever N is. :func:`plan` lists what is alive at the peak
(the logit chunk, the ``[C, H]`` operands and products, the entropy block, the filtered
mode's gathered blocks, the per-call O(V) and O(N) vectors) and picks the largest chunk
that fits. ``tests/test_torch_backend.py`` checks the plan against the torch allocator's
measured peak, so an allocation the plan forgets fails there.

Not counted (outside any chunk size's control): the BLAS library's internal packing
buffers (:data:`RESERVE_BYTES` is held back for them) and, for 16-bit or non-contiguous
inputs only, the per-call fp32 copy of the weight and the fp32 weight-gradient
accumulator (two ``V·H·4`` buffers; fp32 contiguous inputs, the CPU case, need neither).
"""
from __future__ import annotations

from dataclasses import dataclass, field

EXTRA_BUDGET_BYTES = 64 << 20
# Held back for BLAS packing buffers and allocator rounding, which the plan cannot see.
RESERVE_BYTES = 4 << 20
# Vocab block of the entropy reduction (its temporary is rows × this).
ENTROPY_BLOCK = 8192
# Share of the budget for filtered mode's gathered blocks (columns of p, rows of W, ∂W).
FILTER_SHARE = 8
# Per active row: lp/entropy/loss outputs, indices, gathered targets and loss inputs, and
# the loss math's per-row temporaries (a few dozen 4- or 8-byte vectors).
PER_ROW_VECTORS = 256
# Largest block temporary of the whole-batch path: ∂W's blocks each re-read (and BLAS
# re-packs) all of h, so fewer, larger blocks are faster; past ~48 MiB nothing is gained.
WHOLE_BATCH_BLOCK = 48 << 20


@dataclass(frozen=True)
class ChunkPlan:
    rows: int            # C: rows per chunk (equal-sized chunks, no short tail)
    filter_cols: int     # vocab columns per gathered block in filtered mode (0: not filtered)
    temporaries: dict = field(default_factory=dict)  # name -> bytes alive at the peak

    @property
    def total(self) -> int:
        return sum(self.temporaries.values())


def plan(n_rows: int, hidden: int, vocab: int, *, grads: bool = True, entropy: bool = False,
         filtered: bool = False, bias: bool = False, tau_scaled: bool = False,
         in_bytes: int = 4, budget: int | None = None) -> ChunkPlan:
    """Largest balanced chunk whose temporaries (listed in the result) fit in ``budget``.

    ``n_rows``: active rows; ``in_bytes``: element size of the hidden states (a 16-bit
    chunk is gathered before it is cast); ``tau_scaled``: temperature ≠ 1 (one more
    ``[C, H]`` operand).
    """
    budget = EXTRA_BUDGET_BYTES if budget is None else budget
    n = max(n_rows, 1)
    fixed = {"per-row vectors": PER_ROW_VECTORS * n}
    if bias:
        fixed["scaled bias"] = 4 * vocab
        if grads:
            fixed["bias-grad chunk"] = 4 * vocab
    if filtered and grads:
        fixed["column max + keep mask + kept ids"] = (4 + 1 + 8) * vocab
    filter_share = budget // FILTER_SHARE if filtered and grads else 0
    # [C, H] fp32 operands alive together: hc (+ hz), and with grads ∂h's product and hc·s.
    n_h = 1 + int(tau_scaled) + (2 if grads else 0) + (in_bytes / 4 if in_bytes != 4 else 0)
    per_row = 4 * vocab + 4 * hidden * n_h + (4 * min(vocab, ENTROPY_BLOCK) if entropy else 0)
    room = budget - RESERVE_BYTES - sum(fixed.values()) - filter_share
    c = max(1, min(n, room // per_row)) if room > 0 else 1
    c = -(-n // -(-n // c))  # equal-sized chunks: no short tail GEMM
    temps = dict(fixed)
    temps["logit chunk"] = 4 * c * vocab
    temps["[C, H] operands"] = int(4 * c * hidden * n_h)
    if entropy:
        temps["entropy block"] = 4 * c * min(vocab, ENTROPY_BLOCK)
    cols = 0
    if filter_share:
        # Per block: p's kept columns [C, k], W's kept rows [k, H], their ∂W product [k, H].
        cols = max(1, filter_share // (4 * (c + 2 * hidden)))
        temps["filtered block"] = 4 * cols * (c + 2 * hidden)
    return ChunkPlan(rows=c, filter_cols=cols, temporaries=temps)


def whole_batch_block(n_rows: int, hidden: int, vocab: int, *, copy_bytes: int, bias: bool,
                      budget: int | None = None) -> int:
    """Bytes of one block temporary of the whole-batch path (:mod:`.whole_batch`), or 0
    when it does not fit ``budget``.

    Its logits live in the weight gradient's storage; what it adds is the per-row
    vectors, ``copy_bytes`` (the active rows' fp32 copy, when ``h`` cannot be used as is),
    O(V) vectors (the bias-gradient sum; the scaled bias and its gradient) and, one at a
    time, a block temporary: zᵀ rows copied aside, ∂h rows (with their 16-bit cast: 1.5
    blocks), entropy's ``e·log e``.
    """
    budget = EXTRA_BUDGET_BYTES if budget is None else budget
    fixed = PER_ROW_VECTORS * max(n_rows, 1) + copy_bytes + 4 * vocab * (1 + 2 * int(bias))
    block = min(WHOLE_BATCH_BLOCK, (budget - RESERVE_BYTES - fixed) * 2 // 3)
    smallest = 4 * 8 * max(n_rows, hidden)  # 8 vocab rows of zᵀ, 8 rows of ∂h
    return block if block >= smallest else 0


__all__ = ["plan", "whole_batch_block", "ChunkPlan", "EXTRA_BUDGET_BYTES", "RESERVE_BYTES",
           "ENTROPY_BLOCK"]
