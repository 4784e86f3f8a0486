"""LocalisationScore and its functional form on hand-made masks and boxes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_attn.metrics import LocalisationScore, localisation_ratio


def _upsampled_ratio(mask: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Reference: nearest-upsample the mask to ``size x size`` and count pixels (int boxes)."""
    up = F.interpolate(mask.float(), size=(size, size), mode="nearest")[:, 0]
    out = []
    for m, (x0, y0, x1, y1) in zip(up, boxes.long().tolist(), strict=True):
        inside = m[y0:y1, x0:x1].sum() / m.sum()
        out.append(inside / ((x1 - x0) * (y1 - y0) / size**2))
    return torch.stack(out)


def test_all_mass_inside_box_gives_inverse_box_share() -> None:
    # 32x32 image, box x in [8, 24), y in [8, 16): share 16 * 8 / 1024 = 1/8.
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 2:4, 2:6] = 1.0  # exactly the box at mask resolution (scale 1/4)
    boxes = torch.tensor([[8.0, 8.0, 24.0, 16.0]])
    ratio = localisation_ratio(mask, boxes, (32, 32))
    assert ratio.item() == pytest.approx(8.0)


def test_part_of_the_box_still_counts_as_all_inside() -> None:
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 5, 5] = 0.7  # one cell deep inside the box
    boxes = torch.tensor([[4.0, 4.0, 12.0, 12.0]])
    assert localisation_ratio(mask, boxes, (16, 16)).item() == pytest.approx(16 * 16 / 64)


@pytest.mark.parametrize("mask_hw", [(8, 8), (7, 5), (1, 1), (30, 30)])
def test_uniform_mask_scores_one(mask_hw: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    xy0 = torch.rand(6, 2, generator=g) * 20
    wh = 1 + torch.rand(6, 2, generator=g) * 9  # fractional boxes on a 30x30 image
    boxes = torch.cat([xy0, xy0 + wh], dim=1)
    mask = torch.full((6, 1, *mask_hw), 0.3)
    ratio = localisation_ratio(mask, boxes, (30, 30))
    torch.testing.assert_close(ratio, torch.ones(6))


def test_mass_outside_box_scores_zero() -> None:
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 0, 0] = 1.0
    boxes = torch.tensor([[16.0, 16.0, 32.0, 32.0]])
    assert localisation_ratio(mask, boxes, (32, 32)).item() == 0.0


def test_matches_explicit_upsampling() -> None:
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(5, 1, 8, 8, generator=g)
    xy0 = torch.randint(0, 20, (5, 2), generator=g)
    wh = torch.randint(1, 12, (5, 2), generator=g)
    boxes = torch.cat([xy0, xy0 + wh], dim=1).float()
    torch.testing.assert_close(
        localisation_ratio(mask, boxes, (32, 32)), _upsampled_ratio(mask, boxes, 32)
    )


def test_zero_mask_or_empty_box_scores_one() -> None:
    mask = torch.zeros(2, 1, 4, 4)
    mask[1] = 1.0
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [3.0, 3.0, 3.0, 9.0]])
    torch.testing.assert_close(localisation_ratio(mask, boxes, (16, 16)), torch.ones(2))


def test_inverted_box_is_empty_and_scores_one() -> None:
    # x1 < x0 and y1 < y0 together: no area, not a positive "share" with zero mass inside.
    mask = torch.rand(2, 1, 4, 4)
    boxes = torch.tensor([[12.0, 12.0, 4.0, 4.0], [12.0, 4.0, 4.0, 12.0]])
    torch.testing.assert_close(localisation_ratio(mask, boxes, (16, 16)), torch.ones(2))


def test_metric_mean_of_per_sample_ratios_and_merge() -> None:
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(8, 1, 8, 8, generator=g)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 24.0]]).repeat(8, 1)
    expected = localisation_ratio(mask, boxes, (32, 32)).mean()

    whole = LocalisationScore()
    whole.update(mask, boxes, (32, 32))
    torch.testing.assert_close(whole.compute(), expected)

    # Two "ranks": the sum-reduced states give the score of the union.
    a, b = LocalisationScore(), LocalisationScore()
    a.update(mask[:3], boxes[:3], (32, 32))
    b.update(mask[3:], boxes[3:], (32, 32))
    a.merge_state(b)
    torch.testing.assert_close(a.compute(), expected)
    assert int(a.count) == 8

    whole.reset()
    assert int(whole.count) == 0


@pytest.mark.parametrize(
    ("mask", "boxes", "size", "match"),
    [
        (torch.rand(2, 3, 4, 4), torch.zeros(2, 4), (8, 8), "mask must be"),
        (torch.rand(2, 1, 4, 4), torch.zeros(3, 4), (8, 8), "boxes must be"),
        (torch.rand(2, 1, 4, 4), torch.zeros(2, 4), (8,), "image_size"),
        (torch.rand(2, 1, 4, 4), torch.zeros(2, 4), (0, 8), "image_size"),
        (torch.rand(1, 1, 4, 4), torch.tensor([[float("nan"), 0, 4, 4]]), (8, 8), "finite"),
    ],
)
def test_bad_inputs_raise(mask, boxes, size, match) -> None:
    with pytest.raises(ValueError, match=match):
        localisation_ratio(mask, boxes, size)
