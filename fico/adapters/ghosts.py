"""Ragged batches: ghost slots.

The samples of one batch may hold different numbers of visual tokens (images of different
sizes, a different number of images, or a content-dependent schedule earlier in the
forward), so one step removes a different number of tokens from each. The step then runs
sample by sample, and a sample left shorter than the longest keeps some of its discarded
tokens in place as **ghost slots**: they stay in the hidden states and the KV cache, but no
query attends to them (their key column is masked in every row but their own, in prefill and
in every decode step), and later steps see them as neither visual, text nor candidate. Each
sample's real tokens therefore compute what they compute with the sample alone, while the
batch stays one rectangular tensor the model's kernels accept.

Ghost slots cost attention and MLP work for ``max_b R_b - R_b`` extra tokens per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import InputError
from ..recipe.plan import PlannedStep
from ..run import run_step
from ..state import TokenState, gather_tokens

#: the per-token extra that marks ghost slots (1) while they travel through later steps
GHOST = "_fico_ghost"


@dataclass
class RaggedStep:
    """A step's output, rows of the batch padded to one length with ghost slots.

    ``positions`` are those of the step's output (-1 for tokens a compressor created, the
    discarded token's own position for a ghost), ``ghost`` marks the ghost slots, and
    ``extras`` carry the ghost flag under :data:`GHOST`. The rows are not sorted: ghosts
    follow each sample's output.
    """

    hidden: Tensor
    positions: Tensor
    visual: Tensor
    extras: dict[str, Tensor]
    sources: Tensor | None
    ghost: Tensor


def select_sample(state: TokenState, index: int) -> TokenState:
    """Sample ``index`` of a batched state, as a batch of one. Signals that are functions of
    query rows (``attention_rows``, ``rope_gravity``) are asked for the whole batch (rows
    are token indices, shared by the batch's rectangular layout) and answer this sample's."""
    b = state.hidden.shape[0]

    def pick(value):
        if value is None:
            return None
        if callable(value) and not torch.is_tensor(value):
            return lambda rows, *args, fn=value: fn(rows.expand(b, *rows.shape[1:]), *args)[index:index + 1]
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == b:
            return value[index:index + 1]
        return value  # shared by the batch (a leading 1) or not per token

    return replace(state, hidden=pick(state.hidden), positions=pick(state.positions),
                   candidate=pick(state.candidate), visual=pick(state.visual), text=pick(state.text),
                   patch=pick(state.patch), layout=pick(state.layout), sources=pick(state.sources),
                   size=pick(state.size), signals={k: pick(v) for k, v in state.signals.items()},
                   extras={k: pick(v) for k, v in state.extras.items()})


def step_per_sample(planned: PlannedStep, state: TokenState, removals: list[int],
                    synchronize: bool = False) -> tuple[RaggedStep, float]:
    """Run ``planned`` on each sample of ``state`` with its own removal count, and pad the
    outputs to the longest with ghost slots (each sample's first discarded tokens).

    Returns the padded output and the seconds the stages took in all.
    """
    outputs, seconds = [], 0.0
    for index, remove in enumerate(removals):
        one = select_sample(state, index)
        # a sample the step leaves whole is left as it is, as it would be alone
        new, spent = (one, 0.0) if remove == 0 else run_step(planned, one, remove, synchronize)
        outputs.append((one, new))
        seconds += spent
    width = max(new.num_tokens for _, new in outputs)
    rows = [_pad_with_ghosts(one, new, width) for one, new in outputs]
    sources = None if rows[0].sources is None else torch.cat([r.sources for r in rows])
    return RaggedStep(hidden=torch.cat([r.hidden for r in rows]), positions=torch.cat([r.positions for r in rows]),
                      visual=torch.cat([r.visual for r in rows]),
                      extras={k: torch.cat([r.extras[k] for r in rows]) for k in rows[0].extras},
                      sources=sources, ghost=torch.cat([r.ghost for r in rows])), seconds


def _pad_with_ghosts(before: TokenState, after: TokenState, width: int) -> RaggedStep:
    """``after`` (one sample) followed by ``width - after.num_tokens`` of the tokens the step
    discarded from ``before``, unchanged and marked as ghosts."""
    extras = dict(after.extras)
    extras.setdefault(GHOST, torch.zeros_like(after.positions))
    need = width - after.num_tokens
    ghost = torch.zeros_like(after.positions, dtype=torch.bool)
    if need == 0:
        return RaggedStep(after.hidden, after.positions, after.visual, extras, after.sources, ghost)
    gone = (~torch.isin(before.positions[0], after.positions[0]) & (before.positions[0] >= 0)).nonzero()[:, 0]
    if gone.numel() < need:
        raise InputError(f"fico: a ragged batch needs {need} ghost slots for a sample whose step discarded only "
                         f"{gone.numel()} tokens")
    index = gone[:need][None]
    cat = lambda a, b: torch.cat([a, b], dim=1)

    def ghost_extra(name: str, value: Tensor) -> Tensor:
        # a ghost keeps what it had; what the step gave tokens first (a component's new
        # extra) it gets as created tokens do: -1
        if name == GHOST:
            return torch.ones_like(index)
        if name in before.extras:
            return gather_tokens(before.extras[name], index)
        return value.new_full((1, need, *value.shape[2:]), -1)
    sources = None if after.sources is None else cat(
        after.sources, after.sources.new_zeros(1, need, after.sources.shape[-1]))
    return RaggedStep(hidden=cat(after.hidden, gather_tokens(before.hidden, index)),
                      positions=cat(after.positions, gather_tokens(before.positions, index)),
                      visual=cat(after.visual, torch.zeros_like(index, dtype=torch.bool)),
                      extras={k: cat(v, ghost_extra(k, v)) for k, v in extras.items()},
                      sources=sources, ghost=cat(ghost, torch.ones_like(index, dtype=torch.bool)))


def hide_ghosts(mask: Tensor, ghost: Tensor, rows: Tensor | None = None) -> Tensor:
    """``mask`` ``(B, H, Q, K)`` with the key columns of ghost slots ``ghost`` ``(B, K)`` masked in
    every row but the ghost's own (``rows``: ``(B, Q)`` the key index of each query row, or
    None for a square mask whose row i is key i)."""
    b, _, q, k = mask.shape
    if rows is None:
        rows = torch.arange(q, device=mask.device).expand(b, q)
    own = rows[:, :, None] == torch.arange(k, device=mask.device)  # (B, Q, K)
    hidden = (ghost[:, None, :] & ~own)[:, None]
    mask = mask.expand(b, *mask.shape[1:])
    if mask.dtype == torch.bool:
        return mask & ~hidden
    return mask.masked_fill(hidden, torch.finfo(mask.dtype).min)


def causal_mask(batch: int, length: int, device) -> Tensor:
    """The bool ``(B, 1, L, L)`` causal mask a model leaves implicit (None) when no row is padded."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril().expand(batch, 1, length, length)
