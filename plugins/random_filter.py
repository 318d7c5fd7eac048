"""An example third-party filter in one file: discard r random candidates.

Reference it from a recipe with ``plugins: [path/to/random_filter.py]`` and
``filter: {name: random, seed: 0}``. Random pruning is a strong baseline in token-reduction
studies (UniPruneBench, arXiv 2511.02650), so it is worth having next to the real methods.
"""

import torch

import fico
from fico.selection import mask_scores, split_by_scores


class RandomFilter(fico.Filter):
    r"""Random redundancy: :math:`s_i \sim U(0, 1)` i.i.d. per candidate; S = top-r of s.

    Deterministic for a given ``seed``: the same tokens are chosen for the same input shape.
    """

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def split(self, state, r):
        generator = torch.Generator(device="cpu").manual_seed(self.seed + state.layer)
        noise = torch.rand(state.candidate.shape, generator=generator).to(state.hidden.device)
        return split_by_scores(mask_scores(noise, state.candidate), r, targets=state.candidate)


@fico.hookimpl
def fico_filters():
    return [RandomFilter]
