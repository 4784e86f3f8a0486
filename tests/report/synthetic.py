"""Event files written directly with a SummaryWriter, in the diagnostics' tag format,
including what newer callbacks add (evaluation tags, mask min/max, attn/config,
attn/problems, stage-prefixed maps)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_attn.core.statistics import MaskStats, quantities
from lightning_attn.core.tags import encode_name

BLOCK = "net.stage1.dsa"


def write_run(
    path: Path,
    steps: tuple[int, ...] = (10, 20, 30),
    std: float = 0.2,
    config: dict | None = None,
    problems: list[dict] | None = None,
    evaluation: bool = False,
    maps: tuple[str, ...] = (),
    other: dict[str, float] | None = None,
    block: str = BLOCK,
) -> Path:
    """One DSA block (``net.stage1.dsa`` unless ``block`` says) with three branches; returns
    ``path``."""
    w = SummaryWriter(str(path))
    if config is not None:
        w.add_text("attn/config", json.dumps(config), 0)
    for step in steps:
        values = {
            "router/entropy": 0.9, "router/entropy_norm": 0.82, "router/usage_0": 0.5,
            "router/usage_1": 0.3, "router/usage_2": 0.2, "mask/mean": 0.5, "mask/std": std,
            "mask/min": 0.1, "mask/max": 0.9, "mask/sat_low": 0.01, "mask/sat_high": 0.02,
            "param/temperature": 1.0 + step / 100, "param/temperature_grad_norm": 0.01,
        }
        # every other declared mask statistic, so the run has what a callback would log
        values.update({f"mask/{q.tag}": 0.0 for q in quantities(MaskStats)
                       if q.tag is not None and f"mask/{q.tag}" not in values})
        for tag, value in values.items():
            w.add_scalar(f"attn/{encode_name(block)}/{tag}", value, step)
        if evaluation:
            for tag in ("mask/mean", "mask/std", "router/entropy_norm"):
                w.add_scalar(f"val/attn/{encode_name(block)}/{tag}", values[tag], step)
        for tag, value in (other or {}).items():
            w.add_scalar(tag, value, step)
    for i, tag in enumerate(maps):
        image = torch.zeros(3, 8, 16)
        image[i] = 1.0  # red, green, blue: which tag the report chose
        w.add_image(tag, image, steps[-1])
    for doc in problems or []:
        w.add_text("attn/problems", json.dumps(doc), doc["step"])
    w.close()
    return path


def problem(kind: str, step: int = 20, block: str = BLOCK) -> dict:
    return {
        "block": block, "kind": kind, "value": 3.5, "threshold": 2.0, "step": step,
        "message": f"attention block {block!r} at step {step}: {kind} happened. Try: a fix.",
    }
