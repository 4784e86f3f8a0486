"""Every keyword timm's model code passes to an ``attn_layer`` / ``se_layer`` reaches our
blocks: the vocabulary is read from timm's installed source (not listed by hand), and the
models whose configs pass those keywords are built for real with our blocks (random init,
nothing downloads)."""

from __future__ import annotations

import ast
import inspect
import math
import re
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.blocks.factory import TIMM_KEYWORDS_REFUSED, make_divisible

DOCS = Path(__file__).resolve().parents[2] / "docs" / "blocks.md"
# Where timm calls the layer it was given: a conv-attention (SE-like) layer takes the
# channels first; token attention (ViT, Swin, GCViT windows) takes num_heads, which no
# SE-like layer has.
_LAYER_CALLS = {"attn_layer", "se_layer", "create_attn"}


def _callee(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        # byobnet's LayerFn: layers.attn(chs) builds its attn_layer partial
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        return "attn_layer" if (func.attr, owner) == ("attn", "layers") else func.attr
    return None


def timm_attention_keywords() -> dict[str, set[str]]:
    """Keyword -> ``file:line`` where timm's models pass it to an attention layer: calls of
    the layer (``attn_layer(chs, act_layer=...)``, ``create_attn(layer, chs, ...)``, the
    EfficientNet builder's ``se_layer(8, rd_ratio=1.0)``) and the models' ``attn_kwargs``
    (a config's ``attn_kwargs=dict(rd_ratio=.25)``, ``attn_kwargs['rd_channels'] = ...``)."""
    found: dict[str, set[str]] = {}
    for path in sorted((Path(timm.__file__).parent / "models").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        # A dict named attn_kwargs filled by item is an SE layer's only where timm's layer
        # factory builds it (eva's holds its token attention's keywords).
        se_factory = "get_attn" in source or "create_attn" in source
        for node in ast.walk(ast.parse(source)):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            names: list[str] = []
            if isinstance(node, ast.Call) and _callee(node) in _LAYER_CALLS and node.args:
                names = [k.arg for k in node.keywords if k.arg]
                if "num_heads" in names:
                    names = []  # token attention
            elif (isinstance(node, ast.keyword) and node.arg == "attn_kwargs"
                  and isinstance(node.value, ast.Call) and _callee(node.value) == "dict"):
                names = [k.arg for k in node.value.keywords if k.arg]
            elif (se_factory and isinstance(node, ast.Subscript)
                  and isinstance(node.value, ast.Name)
                  and node.value.id == "attn_kwargs" and isinstance(node.slice, ast.Constant)):
                names = [node.slice.value]
            for name in names:
                found.setdefault(name, set()).add(where)
    return found


KEYWORDS = timm_attention_keywords()


def test_the_scan_reads_what_timm_passes() -> None:
    # A few anchors, so a change of timm's layout cannot empty the scan silently.
    assert {"rd_ratio", "rd_divisor", "act_layer", "rd_channels", "bias"} <= set(KEYWORDS)
    assert any(w.startswith("nfnet.py") for w in KEYWORDS["rd_ratio"])
    assert any(w.startswith("_efficientnet_builder.py") for w in KEYWORDS["rd_ratio"])


@pytest.mark.parametrize("block", [CoordinateAttention, DynamicSpatialAttention])
@pytest.mark.parametrize("keyword", sorted(KEYWORDS))
def test_each_keyword_is_taken_or_refused_with_a_documented_reason(block, keyword) -> None:
    accepted = set(inspect.signature(block.__init__).parameters)
    if keyword in TIMM_KEYWORDS_REFUSED:
        assert keyword not in accepted
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{keyword}'"):
            block(8, **{keyword: 8})
    else:
        assert keyword in accepted, (
            f"timm passes {keyword}= to attention layers ({sorted(KEYWORDS[keyword])[:3]}), "
            f"which {block.__name__} does not take: accept it, or refuse it in "
            "TIMM_KEYWORDS_REFUSED with the reason"
        )


def test_the_docs_say_what_each_block_does_with_each_keyword() -> None:
    section = DOCS.read_text(encoding="utf-8").split("### What timm passes")[1].split("\n## ")[0]
    for keyword in KEYWORDS:
        assert re.search(rf"`{keyword}\b", section), keyword


DSA = partial(DynamicSpatialAttention, return_mask=False)  # timm wants a tensor back


def _blocks(model: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


def _timm_se(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "SEModule"]


# model -> the width rule its config's attn_kwargs give CoordinateAttention
MODELS = {
    "nf_regnet_b0": lambda c: max(8, math.floor(c * 0.5)),  # rd_ratio=0.5
    "regnetz_b16": lambda c: max(8, math.floor(c * 0.25)),  # rd_ratio=0.25
    "test_nfnet": lambda c: max(8, make_divisible(c * 0.25, 8)),  # rd_ratio=.25, rd_divisor=8
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_whose_configs_pass_rd_keywords_build_with_both_blocks(name: str) -> None:
    reference = len(_timm_se(timm.create_model(name, pretrained=False)))
    assert reference > 0  # the config's own SE layers, at the places ours take
    coord = timm.create_model(name, pretrained=False, attn_layer=CoordinateAttention)
    blocks = _blocks(coord, CoordinateAttention)
    assert len(blocks) == reference and not _timm_se(coord)
    assert all(b.mid_channels == MODELS[name](b.in_channels) for b in blocks)
    dsa = timm.create_model(name, pretrained=False, attn_layer=DSA)
    assert len(_blocks(dsa, DynamicSpatialAttention)) == reference


@pytest.mark.parametrize("layer", [CoordinateAttention, DSA], ids=["coord", "dsa"])
def test_a_model_with_rd_keywords_runs_and_trains_with_our_blocks(layer) -> None:
    model = timm.create_model("test_nfnet", pretrained=False, num_classes=3, attn_layer=layer)
    y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    y.sum().backward()
    block = _blocks(model, getattr(layer, "func", layer))[0]
    assert all(p.grad is not None for p in block.parameters())


def test_cspnet_passes_its_activation_and_rd_ratio() -> None:
    """CSPNet calls ``attn_layer(chs, act_layer=...)`` with its config's ``rd_ratio``."""
    import dataclasses

    from timm.models import cspnet

    cfg = cspnet.model_cfgs["cs3sedarknet_l"]  # attn_layer='se', attn_kwargs rd_ratio=.25
    for layer, cls in ((CoordinateAttention, CoordinateAttention), (DSA, DynamicSpatialAttention)):
        stages = dataclasses.replace(cfg.stages, attn_layer=layer)
        model = cspnet.CspNet(dataclasses.replace(cfg, stages=stages), num_classes=3)
        blocks = _blocks(model, cls)
        assert len(blocks) == 21
        act = [b.act_name for b in blocks] if cls is CoordinateAttention else [
            b.router_act for b in blocks]
        assert set(act) == {"silu"}
