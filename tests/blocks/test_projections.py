"""QK-clip's rescaling on each kind of attention: timm's fused ``qkv`` (ViT; EVA with its
``q_bias`` and rotary embedding), timm's grouped-query ``AttentionRope`` (separate ``q_proj`` /
``k_proj``), ``nn.MultiheadAttention``'s packed ``in_proj`` and its separate weights with
``kdim`` / ``vdim`` and ``bias_k``, and Hugging Face's Llama (grouped-query, rotary) and BERT
(``query`` / ``key``): a clipped head's max logit lands on the threshold (1e-5), every other
head's weights and logits stay bitwise as they were, and a shared key head is never moved."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_attn.blocks.discovery import find_attention_blocks
from lightning_attn.blocks.projections import query_key_projections

from . import head_models as models

pytest.importorskip("timm")

_G = torch.Generator().manual_seed(3)
_IMAGES = torch.randn(2, 3, 32, 32, generator=_G)
_SEQ = torch.randn(3, 7, 16, generator=_G)
_QUERIES, _KEYS = torch.randn(5, 2, 16, generator=_G), torch.randn(9, 2, 12, generator=_G)
_TOKENS = torch.randint(0, 64, (2, 9), generator=_G)


def _rope_gqa() -> nn.Module:
    from timm.layers.attention import AttentionRope

    return models.sharpen(AttentionRope(32, num_heads=4, num_kv_heads=2, qkv_fused=False))


def _hf(build):
    def built():
        pytest.importorskip("transformers")
        return build(1)
    return built


#: name -> (build, forward, key heads per query head group: 1 one-to-one)
CASES = {
    "timm vit (fused qkv)": (lambda: models.timm_vit(1), lambda m: m(_IMAGES)),
    "timm eva02 (qkv, q_bias, rotary)": (lambda: models.timm_eva(1),
                                         lambda m: m(_IMAGES[..., :28, :28])),
    "timm AttentionRope (grouped q_proj/k_proj)": (_rope_gqa, lambda m: m(_SEQ.repeat(1, 1, 2))),
    "mha (packed in_proj)": (lambda: models.sharpen(nn.MultiheadAttention(16, 4, batch_first=True)),
                             lambda m: m(_SEQ, _SEQ, _SEQ, need_weights=False)),
    "mha kdim (separate weights, bias_k)": (
        lambda: models.sharpen(nn.MultiheadAttention(16, 4, kdim=12, vdim=12, add_bias_kv=True)),
        lambda m: m(_QUERIES, _KEYS, _KEYS, need_weights=False)),
    "hf llama (grouped-query, rotary)": (_hf(models.llama), lambda m: m(input_ids=_TOKENS)),
    "hf bert (query/key)": (_hf(models.bert), lambda m: m(input_ids=_TOKENS)),
}


def _heads(model: nn.Module) -> dict:
    blocks, _ = find_attention_blocks(nn.ModuleList([model]), third_party=True)
    heads = {n: b for n, b in blocks.items() if getattr(b, "num_heads", None)}
    for name, block in blocks.items():
        if name not in heads:
            block.clear_recording()
    return heads


def _max_logits(blocks: dict, model: nn.Module, run) -> dict[str, torch.Tensor]:
    for b in blocks.values():
        b.reset_max_logits()
    with torch.no_grad():
        run(model)
    return {n: b.tracked_max_logits.clone() for n, b in blocks.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_a_clipped_head_lands_on_the_threshold_and_no_other_weight_moves(name):
    build, run = CASES[name]
    torch.manual_seed(0)
    model = build()
    (block_name, block), = _heads(model).items()  # one attention module per case
    try:
        block.track_max_logits("test")
        before = _max_logits({block_name: block}, model, run)[block_name]
        projections = query_key_projections(getattr(block, "module", block), block.num_heads)
        threshold = float(before.median())  # some heads over it, some not
        over = before > threshold
        assert over.any() and not over.all()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        gamma = projections.clip_(before, threshold)
        assert torch.equal(gamma[~over], torch.ones(int((~over).sum())))
        after = _max_logits({block_name: block}, model, run)[block_name]
        assert torch.allclose(after[over].double(), torch.tensor(threshold, dtype=torch.float64),
                              rtol=1e-5, atol=0)
        assert torch.equal(after[~over], before[~over])  # bitwise
        written = {id(t) for t in projections.parameters()}
        d = projections.head_dim
        for pname, p in model.named_parameters():
            if id(p) not in written:
                assert torch.equal(p, weights[pname]), pname  # values, output projection ...
        for rows in projections.query + (() if projections.grouped else projections.key):
            segment = rows.tensor.narrow(rows.dim, rows.start, rows.heads * d).detach()
            old = weights[next(n for n, p in model.named_parameters() if p is rows.tensor)]
            old = old.narrow(rows.dim, rows.start, rows.heads * d)
            for h in range(rows.heads):
                head = segment.narrow(rows.dim, h * d, d)
                was = old.narrow(rows.dim, h * d, d)
                moved = not torch.equal(head, was)
                assert moved == bool(over[h]) or not was.any(), (h, rows)  # zeros stay zeros
        if projections.grouped:  # a shared key head never moves
            assert projections.num_kv_heads < projections.num_heads
            for rows in projections.key:
                old = weights[next(n for n, p in model.named_parameters() if p is rows.tensor)]
                assert torch.equal(rows.tensor, old)
    finally:
        block.clear_recording()


def test_maxima_that_are_not_over_the_threshold_clip_nothing():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 4)
    projections = query_key_projections(attention, 4)
    weights = attention.in_proj_weight.detach().clone()
    gamma = projections.clip_(torch.tensor([-math.inf, math.nan, 5.0, 100.0]), 100.0)
    assert gamma.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert torch.equal(attention.in_proj_weight, weights)


def test_normalised_queries_and_unknown_projections_are_refused_with_why():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                            qk_norm=True)
    with pytest.raises(ValueError, match=r"Attention normalises its queries and keys \(q_norm"):
        query_key_projections(vit.blocks[0].attn, 3)

    class SharedKeyValue(nn.Module):  # q and a fused kv: no layout the clip reads
        def __init__(self) -> None:
            super().__init__()
            self.q, self.kv = nn.Linear(8, 8), nn.Linear(8, 16)

    with pytest.raises(ValueError, match=r"SharedKeyValue has none of the query / key "
                                         r"projections .* q_proj/k_proj, query/key"):
        query_key_projections(SharedKeyValue(), 2)
    fused = nn.Module()
    fused.qkv = nn.Linear(8, 20)
    with pytest.raises(ValueError, match="fused qkv has 20 outputs, not 3 x 2 heads"):
        query_key_projections(fused, 2)
