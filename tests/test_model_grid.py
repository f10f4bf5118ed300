"""The model grid: padding and resizing slices and label maps, and undoing both."""

from __future__ import annotations

import torch

from tedm_core.preprocessing.spatial import from_model_grid, labels_to_model_grid, to_model_grid


def test_a_map_on_the_model_grid_comes_back_on_the_slice_grid():
    slices = torch.rand(2, 1, 30, 48)
    grid, transform = to_model_grid(slices, 16)
    assert grid.shape == (2, 1, 16, 16)
    # The padding (rows above and below a wide slice) looks like air and is cropped away again.
    torch.testing.assert_close(grid[:, :, [0, -1]], torch.full((2, 1, 2, 16), -1.0))
    constant = torch.full((2, 3, 16, 16), 0.25)
    assert from_model_grid(constant, transform).shape == (2, 3, 30, 48)
    torch.testing.assert_close(from_model_grid(constant, transform), torch.full((2, 3, 30, 48), 0.25))


def test_labels_on_the_model_grid_count_the_padding_as_background():
    labels = torch.ones(1, 4, 8, dtype=torch.long)  # a wide slice, padded to 8 x 8 then halved
    _, transform = to_model_grid(torch.zeros(1, 1, 4, 8), 4)
    targets = labels_to_model_grid(labels, transform)
    assert targets.dtype == torch.long and targets.shape == (1, 4, 4)
    assert torch.all(targets[0, [0, -1]] == 0) and torch.all(targets[0, 1:3] == 1)
