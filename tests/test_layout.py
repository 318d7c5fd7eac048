"""Token layout: windows never mix images or parts, and a single grid reads as before."""

import torch

from fico.filters.local_penalty import local_penalty, penalise_windows
from fico.layout import grid_layout, windows
from fico.state import TokenState


def entries(*rows):
    return torch.tensor([rows], dtype=torch.long)


def test_windows_are_per_image_and_part():
    # image 0: part 0 on a 2 x 2 grid, part 1 on a 2 x 4 grid; image 1: part 0 again
    layout = entries([0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0], [0, 1, 1, 1], [0, 1, 0, 2], [0, 1, 1, 3],
                     [1, 0, 0, 0], [1, 0, 1, 1], [-1, -1, -1, -1])
    window, corner, bound = windows(layout, ((2, 2), (2, 4)), 2, whole=True)
    w = window[0].tolist()
    assert w[0] == w[1] and w[2] == w[3] and w[4] == w[5]
    assert len({w[0], w[2], w[4], w[6]}) == 4, "images and parts never share a window"
    assert w[6] == w[7] and w[8] == -1
    assert max(w) < bound
    assert corner[0].tolist() == [True, False, True, False, True, False, True, False, False]


def test_a_partial_window_is_dropped_only_when_whole_windows_are_asked_for():
    layout = grid_layout(torch.arange(9)[None], (3, 3))
    whole, _, _ = windows(layout, ((3, 3),), 2, whole=True)
    every, _, _ = windows(layout, ((3, 3),), 2, whole=False)
    assert whole[0].tolist() == [0, 0, -1, 0, 0, -1, -1, -1, -1]
    assert every[0].tolist() == [0, 0, 1, 0, 0, 1, 2, 2, 3]


def test_the_local_penalty_raises_one_score_per_image():
    scores = torch.tensor([[1.0, 3.0, 2.0, 5.0]])
    one_image = grid_layout(torch.tensor([[0, 1, 2, 3]]), (2, 2))
    assert penalise_windows(scores, one_image, ((2, 2),), 2, 2.0).tolist() == [[1.0, 3.0, 2.0, 10.0]]
    two_images = torch.tensor([[[0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 1]]])
    assert penalise_windows(scores, two_images, ((2, 2),), 2, 2.0).tolist() == [[1.0, 6.0, 2.0, 10.0]]


def test_a_single_grid_reads_as_its_cells():
    torch.manual_seed(0)
    scores = torch.randn(2, 30)
    patch = torch.randperm(36)[:30].expand(2, -1).clone()
    patch[:, :3] = -1
    assert torch.equal(local_penalty(scores, patch, (6, 6), 2, 3.0),
                       penalise_windows(scores, grid_layout(patch, (6, 6)), ((6, 6),), 2, 3.0))


def test_a_state_derives_its_layout_from_cells_or_keeps_the_one_its_site_gave():
    hidden = torch.zeros(1, 4, 2)
    patch = torch.tensor([[-1, 0, 1, 5]])
    state = TokenState(hidden=hidden, positions=torch.arange(4)[None], candidate=patch >= 0,
                       visual=torch.ones(1, 4, dtype=torch.bool), patch=patch, grid=(2, 3))
    layout, grids = state.token_layout()
    assert grids == ((2, 3),) and state.layout is None, "derived when asked, not stored"
    assert layout[0].tolist() == [[-1, -1, -1, -1], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 2]]
    kept = state.keep(torch.tensor([[3, 1]])).append(torch.zeros(1, 1, 2))
    assert kept.token_layout()[0][0].tolist() == [[0, 0, 1, 2], [0, 0, 0, 0], [-1, -1, -1, -1]]

    given = torch.tensor([[[-1, -1, -1, -1], [0, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0]]])
    state = TokenState(hidden=hidden, positions=torch.arange(4)[None], candidate=patch >= 0,
                       visual=torch.ones(1, 4, dtype=torch.bool), patch=patch, grid=(2, 3), layout=given,
                       grids=((2, 3), (1, 2)))
    kept = state.keep(torch.tensor([[3, 1]])).append(torch.zeros(1, 1, 2))
    assert kept.token_layout() == (kept.layout, ((2, 3), (1, 2)))
    assert kept.layout[0].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [-1, -1, -1, -1]]


def test_pooling_and_the_local_penalty_read_a_layout_their_site_gives():
    from fico.filters.window import token_windows

    patch = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    by_cells = TokenState(hidden=torch.zeros(1, 8, 2), positions=torch.arange(8)[None], candidate=patch >= 0,
                          visual=torch.ones(1, 8, dtype=torch.bool), patch=patch, grid=(2, 2))
    two_images = torch.cat([grid_layout(patch[:, :4], (2, 2)), grid_layout(patch[:, 4:], (2, 2))], dim=1)
    two_images[0, 4:, 0] = 1
    by_layout = TokenState(hidden=torch.zeros(1, 8, 2), positions=torch.arange(8)[None], candidate=patch >= 0,
                           visual=torch.ones(1, 8, dtype=torch.bool), patch=patch, grid=(2, 2), layout=two_images,
                           grids=((2, 2),))
    assert token_windows(by_cells, 2)[0].tolist() == [[0] * 8], "cells alone: one grid, one window"
    window, corner = token_windows(by_layout, 2)
    assert window[0, :4].unique().numel() == 1 and window[0, 4:].unique().numel() == 1
    assert window[0, 0] != window[0, 4] and corner[0].tolist() == [True, False, False, False] * 2
