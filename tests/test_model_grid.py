"""The model grid: padding and resizing slices and label maps, and undoing both."""

from __future__ import annotations

import numpy as np
import torch

from tedm_core.preprocessing.spatial import from_model_grid, labels_to_model_grid, model_grid_window, to_model_grid


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


def test_the_model_grid_window_of_a_box_alone_decides_the_box_on_the_slice_grid():
    """``model_grid_window``: whatever lies outside the window (NaN here) never reaches the box
    when a map comes back from the model grid, for slices larger and smaller than the grid, wide
    and tall, and boxes anywhere in them; an empty box has an empty window."""
    generator = np.random.default_rng(5)
    for _ in range(200):
        h, w = (int(v) for v in generator.integers(5, 300, 2))
        size = int(generator.choice([16, 32, 64, 128]))
        _, transform = to_model_grid(torch.zeros(1, 1, h, w), size)
        top, left = int(generator.integers(0, h)), int(generator.integers(0, w))
        box = (top, int(generator.integers(top + 1, h + 1)), left, int(generator.integers(left + 1, w + 1)))
        a, b, c, d = model_grid_window(box, transform)
        maps = torch.rand(1, 2, size, size, dtype=torch.float64)
        windowed = torch.full_like(maps, float("nan"))
        windowed[..., a:b, c:d] = maps[..., a:b, c:d]
        rows, columns = slice(box[0], box[1]), slice(box[2], box[3])
        expected = from_model_grid(maps, transform)[..., rows, columns]
        assert torch.equal(from_model_grid(windowed, transform)[..., rows, columns], expected), (h, w, size, box)
    assert model_grid_window((3, 3, 0, 5), transform) == (0, 0, 0, 0)
