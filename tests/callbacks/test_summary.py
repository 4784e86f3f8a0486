"""The summary table reads at 80 columns: whole short names, labelled branches."""

from rich.console import Console

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.callbacks import render_summary
from lightning_attn.core import HealthThresholds, find_problems
from lightning_attn.core.statistics import (
    BlockInfo,
    BlockStats,
    GlobalStats,
    MaskStats,
    RouterStats,
    StatisticsLayout,
)


def _stats():
    mask = MaskStats(count=100, mean=0.47, std=0.031, sat_low=0.0, sat_high=0.02)
    router = RouterStats(count=8, entropy=1.05, entropy_norm=0.96, usage=(0.42, 0.29, 0.29))
    # the parameters' symbols (T, α_h, ...) are what the blocks declare
    dsa = BlockStats(masks={"mask": mask}, router=router, params={"temperature": 1.0},
                     param_specs=DynamicSpatialAttention().attention_parameter_specs())
    coord = BlockStats(
        masks={"mask_h": mask, "mask_w": MaskStats(100, 0.5, 0.001, 0.0, 0.0)},
        params={"alpha_h": 0.5, "alpha_w": 0.5, "beta": 0.5},
        param_specs=CoordinateAttention(8, per_axis_alpha=True,
                                        beta=0.5).attention_parameter_specs(),
    )
    names = [f"model.backbone.features.stage{i}.attention" for i in (1, 2, 3)]
    return GlobalStats(step=120, blocks={names[0]: dsa, names[1]: coord, names[2]: dsa}), names


def test_table_fits_80_columns_with_whole_names_and_branch_labels():
    stats, names = _stats()
    infos = [BlockInfo(names[0], StatisticsLayout(("mask",), 3), ("temperature",),
                       branch_names=("3x3", "7x7", "7x7 d2"))]
    problems = find_problems(stats, HealthThresholds())
    console = Console(width=80, record=True, color_system=None)
    console.print(render_summary(stats, problems, {"x|mask_collapse": 3}, infos))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    for short in ("stage1.attention", "stage2.attention", "stage3.attention"):
        assert short in text  # whole, never folded across lines
    for label in ("3x3 0.42", "7x7 0.29", "7x7d2 0.29", "H 0.96"):
        assert label in text
    assert "collapse!" in text  # mask_w's std 0.001 is active at this step
    assert "shortest unique name" in text

