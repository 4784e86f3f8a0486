"""The images of transformer heads: a class token's attention laid over its image's patches
(found from the number of keys and the image's size alone), and the layer x head heatmaps
whose cells are the colours of the values they show."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_attn.callbacks.maps import (
    colormap,
    head_heatmaps,
    token_grid,
    token_map,
)


@pytest.mark.parametrize(("keys", "size", "grid"), [
    (197, (224, 224), (1, 14, 14)),     # ViT-B/16: a class token and 14 x 14 patches
    (201, (224, 224), (5, 14, 14)),     # ... with four registers
    (1 + 14 * 20, (224, 320), (1, 14, 20)),  # a wide image
    (65, (32, 32), (1, 8, 8)),
    (49, (224, 224), None),             # a 7 x 7 window of Swin
    (196, (224, 224), None),            # patches without a class token (a global-pool ViT)
])
def test_token_grid_finds_the_prefix_and_the_patches(keys, size, grid):
    assert token_grid(keys, size) == grid


def test_token_map_lays_the_patches_out_row_by_row_scaled_to_the_largest():
    attention = torch.zeros(2, 1 + 2 * 3)
    attention[:, 0] = 0.5  # the class token itself: not a patch
    attention[0, 1 + 4] = 0.25  # row 1, column 1
    attention[0, 1 + 0] = 0.125
    attention[1, 1:] = 0.5 / 6
    got = token_map(attention, (20, 30))  # patches of 10 x 10 pixels: 2 x 3
    assert got.shape == (2, 1, 2, 3)
    assert got[0, 0, 1, 1] == 1.0 and got[0, 0, 0, 0] == 0.5 and got[0].sum() == 1.5
    torch.testing.assert_close(got[1], torch.ones(1, 2, 3))
    assert token_map(attention, (21, 30)) is None  # no whole-pixel patches


CELL = 11 * 11  # pixels of a heatmap cell
MISSING = [214.0, 214.0, 222.0]  # its colour where a head is missing or not finite


def test_heatmap_cells_have_the_colours_of_their_values():
    entropy = [[0.0, 1.0, 0.5], [0.25, math.nan]]
    logits = [[2.0, 4.0, 10.0], [6.0, 3.0]]
    image = head_heatmaps(["net.blocks.0.attn", "net.blocks.1.attn"], entropy, logits)
    assert image.dim() == 3 and image.shape[0] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0

    def colour(value: float) -> torch.Tensor:
        return (colormap(torch.tensor(value).view(1, 1, 1, 1))[0, :, 0, 0] * 255).round()

    # find each panel's cells by the colour of a value only one cell has
    pixels = (image * 255).round()
    for value in (0.0, 1.0, 0.5, 0.25, (4.0 - 2.0) / 8.0):
        found = (pixels == colour(value).view(3, 1, 1)).all(dim=0)
        assert found.sum() >= CELL, value  # (the colour bars may hold it too)
    grey = (pixels == torch.tensor(MISSING).view(3, 1, 1)).all(dim=0)
    assert grey.sum() == 3 * CELL  # block 1's NaN entropy, and its third head in each panel
