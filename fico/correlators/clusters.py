"""SparseVLM's recycling: the most relevant discarded tokens, clustered by density peaks."""

from __future__ import annotations

import torch

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..stages import Correlation, Correlator, Split
from ..state import TokenState, gather_tokens


def recycled_count(removed: int, fraction: float) -> int:
    """Discarded tokens SparseVLM recycles: ``int(fraction * removed) + 1``."""
    return int(fraction * removed) + 1 if removed else 0


def cluster_count(removed: int, fraction: float) -> int:
    """Clusters they form: ``int(recycled / 10) + 1``."""
    return int(recycled_count(removed, fraction) / 10) + 1 if removed else 0


def density_peaks(x: torch.Tensor, clusters: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    r"""DPC-kNN clustering (SparseVLM's ``cluster_and_merge``) of ``x`` ``(n, d)``: the index of
    each token's cluster, clusters numbered in the order of their centres' score.

    .. math::  d_{ij} = \frac{\lVert x_i - x_j \rVert}{\sqrt d}, \quad
               \rho_i = \exp\!\Big(-\frac{1}{k}\sum_{j \in \mathrm{kNN}(i)} d_{ij}^2\Big) + \eta_i, \quad
               \delta_i = \min_{j : \rho_j > \rho_i} d_{ij}, \quad
               \text{centres} = \operatorname{top}_c(\rho \delta)

    with k = c neighbours (itself included), :math:`\delta_i` the largest distance for the
    densest token, and :math:`\eta` a tie-breaking noise (``noise``, official: uniform x 1e-6).
    Every token joins its nearest centre; each centre its own cluster.
    """
    n, d = x.shape
    distance = torch.cdist(x[None], x[None])[0] / d ** 0.5
    k = min(clusters, n)
    density = (-(distance.topk(k, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    if noise is not None:
        density = density + noise
    denser = density[None, :] > density[:, None]
    delta = torch.where(denser, distance, distance.max()).min(-1).values
    delta = torch.where(denser.any(-1), delta, distance.max())
    centres = torch.topk(density * delta, min(clusters, n)).indices
    assignment = distance[:, centres].argmin(-1)
    assignment[centres] = torch.arange(centres.numel(), device=x.device)
    return assignment


class DensityPeaks(Correlator):
    r"""SparseVLM v1.5's recycling (Zhang et al., ICML 2025): the ``int(fraction * r) + 1``
    discarded tokens the filter scored least redundant are clustered by density peaks
    (:func:`density_peaks`) into ``int(recycled / 10) + 1`` clusters; the others are dropped.

    .. math::  D' = \operatorname{top}_{\lfloor f r \rfloor + 1}(-s_D), \qquad
               c = \lfloor |D'| / 10 \rfloor + 1, \qquad g_i = \mathrm{DPC}_c(x_{D'})_i

    Each cluster becomes one new token (``cluster_mean``). ``noise`` is the official density
    tie-breaker (uniform x 1e-6), drawn from a generator seeded with ``seed``, so runs repeat.
    """

    name = "density_peaks"
    cite = ("zhang2025sparsevlm",)
    produces = "clusters"

    def __init__(self, fraction: float = 0.3, noise: float = 1e-6, seed: int = 0):
        if not 0 <= fraction <= 1:
            raise RecipeError(f"fraction must be in [0, 1], got {fraction}")
        if noise < 0:
            raise RecipeError(f"noise must be >= 0, got {noise}")
        self.fraction, self.noise, self.seed = fraction, noise, seed

    def correlate(self, state: TokenState, split: Split) -> Correlation:
        b, r = split.discarded.shape
        groups = torch.full((b, r), -1, dtype=torch.long, device=split.discarded.device)
        recycled, clusters = recycled_count(r, self.fraction), cluster_count(r, self.fraction)
        if not r:
            return Correlation(clusters=groups)
        relevance = -torch.gather(split.scores, 1, split.discarded)
        chosen = torch.topk(relevance, min(recycled, r), dim=1).indices  # (B, recycled), in score order
        generator = torch.Generator(device="cpu").manual_seed(self.seed + 1000003 * state.layer)
        for row in range(b):
            x = gather_tokens(state.hidden[row:row + 1], gather_tokens(split.discarded[row:row + 1], chosen[row:row + 1]))[0]
            noise = None
            if self.noise:
                noise = (torch.rand(x.shape[0], generator=generator, dtype=torch.float64) * self.noise).to(x)
            groups[row, chosen[row]] = density_peaks(x, clusters, noise)
        return Correlation(clusters=groups)


@hookimpl
def fico_correlators():
    return [DensityPeaks]
