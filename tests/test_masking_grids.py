"""``expand_mask`` / ``shrink_mask``: coarse scoring units over a finer embedding grid.

Kept apart from ``test_masking.py`` (selection and counts) so that each file stays short. The
grids include non-integer ratios (a CNN's last stage over its stem rarely divides evenly).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masksd.masking import expand_mask, nearest_units, shrink_mask

SETTINGS = settings(max_examples=60, deadline=None)
RAGGED = [((3, 3), (8, 8)), ((3, 5), (7, 11)), ((2, 2), (8, 8)), ((4, 3), (9, 10))]


def one_hot_blocks(unit_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``[N_u, h, w]`` bool: the fine block of every unit, from expanding each unit alone."""
    n_units = unit_grid[0] * unit_grid[1]
    return expand_mask(torch.eye(n_units, dtype=torch.bool), unit_grid, grid).view(n_units, *grid)


@pytest.mark.parametrize("unit_grid, grid", RAGGED, ids=lambda g: "x".join(map(str, g)))
def test_expanded_units_are_solid_blocks_that_tile_the_grid(unit_grid, grid):
    blocks = one_hot_blocks(unit_grid, grid)
    # tiling: every fine position belongs to exactly one unit
    assert torch.equal(blocks.sum(0), torch.ones(grid, dtype=torch.int64))
    for u, block in enumerate(blocks):
        rows = block.any(1).nonzero().flatten()
        cols = block.any(0).nonzero().flatten()
        assert len(rows) and len(cols), f"unit {u} owns no fine position"
        # one solid rectangle of contiguous rows x contiguous columns
        assert torch.equal(rows, torch.arange(int(rows[0]), int(rows[-1]) + 1))
        assert torch.equal(cols, torch.arange(int(cols[0]), int(cols[-1]) + 1))
        assert int(block.sum()) == len(rows) * len(cols)
        # nearest: block sizes are floor or ceil of the ratio, and the blocks keep the units' order
        assert len(rows) in (grid[0] // unit_grid[0], -(-grid[0] // unit_grid[0]))
        assert len(cols) in (grid[1] // unit_grid[1], -(-grid[1] // unit_grid[1]))
        assert divmod(u, unit_grid[1]) == (int(rows[0]) * unit_grid[0] // grid[0],
                                           int(cols[0]) * unit_grid[1] // grid[1])


def test_expand_matches_interpolate_nearest_on_the_ragged_grids():
    for unit_grid, grid in RAGGED:
        units = torch.rand(3, unit_grid[0] * unit_grid[1], generator=torch.Generator().manual_seed(0)) > 0.5
        coarse = units.view(3, 1, *unit_grid).float()
        reference = torch.nn.functional.interpolate(coarse, size=grid, mode="nearest").flatten(1) > 0.5
        assert torch.equal(expand_mask(units, unit_grid, grid), reference)


@st.composite
def grids(draw, fine_at_least_coarse: bool = True):
    h_u, w_u = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    low_h, low_w = (h_u, w_u) if fine_at_least_coarse else (1, 1)
    return (h_u, w_u), (draw(st.integers(low_h, 17)), draw(st.integers(low_w, 17)))


def random_mask(draw, b: int, n: int) -> torch.Tensor:
    return torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n),
                                      min_size=b, max_size=b)))


@SETTINGS
@given(data=st.data(), shapes=grids())
def test_expanded_count_is_the_sum_of_the_masked_blocks(data, shapes):
    unit_grid, grid = shapes
    units = random_mask(data.draw, 3, unit_grid[0] * unit_grid[1])
    sizes = one_hot_blocks(unit_grid, grid).flatten(1).sum(1)  # [N_u] fine positions per unit
    expanded = expand_mask(units, unit_grid, grid)
    assert expanded.shape == (3, grid[0] * grid[1])
    assert torch.equal(expanded.sum(1), (units.long() * sizes).sum(1))
    # every unit owns at least one position, so expanding then shrinking gives the units back
    assert torch.equal(shrink_mask(expanded, grid, unit_grid), units)


@SETTINGS
@given(data=st.data(), shapes=grids(fine_at_least_coarse=False))
def test_shrink_is_the_inverse_mapping_of_expand(data, shapes):
    unit_grid, grid = shapes
    fine = random_mask(data.draw, 3, grid[0] * grid[1])
    shrunk = shrink_mask(fine, grid, unit_grid)
    assert shrunk.shape == (3, unit_grid[0] * unit_grid[1])
    # unit u is maskable exactly when its expanded block meets a maskable fine position
    blocks = one_hot_blocks(unit_grid, grid).flatten(1)  # [N_u, h*w]
    meets = (blocks[None] & fine[:, None]).any(-1)  # [3, N_u]
    assert torch.equal(shrunk, meets)
    # so the selectable units cover every maskable fine position, and nothing else is masked
    assert not (fine & ~expand_mask(shrunk, unit_grid, grid)).any()
    assert torch.equal(expand_mask(shrunk, unit_grid, grid) & fine, fine)
    assert torch.equal(shrink_mask(fine, grid, unit_grid)[:, nearest_units(grid, unit_grid)] & fine, fine)


def test_shrink_does_not_borrow_positions_of_a_neighbouring_unit():
    # (3, 3) units over (8, 8): fine rows 0-2 belong to unit row 0, rows 3-5 to 1, rows 6-7 to 2.
    # Adaptive max-pool bins overlap ([0, 3), [2, 6), [5, 8)): row 2 would also light unit row 1.
    fine = torch.zeros(1, 8, 8, dtype=torch.bool)
    fine[0, 2, :] = True
    shrunk = shrink_mask(fine.flatten(1), (8, 8), (3, 3)).view(3, 3)
    assert shrunk[0].all() and not shrunk[1:].any()


def test_grid_mismatch_names_the_argument():
    with pytest.raises(ValueError, match="unit_mask has 5 positions but unit_grid"):
        expand_mask(torch.zeros(1, 5, dtype=torch.bool), (2, 2), (4, 4))
    with pytest.raises(ValueError, match="mask has 15 positions but grid"):
        shrink_mask(torch.zeros(1, 15, dtype=torch.bool), (4, 4), (2, 2))
