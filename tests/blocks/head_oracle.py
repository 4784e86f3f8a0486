"""The float64 oracle of the head statistics, independent of the recording's code.

Every call of ``F.scaled_dot_product_attention`` during a forward is caught with the queries,
keys, mask, causal flag and scale the model hands it; the oracle then materialises each head's
logits and softmax in float64 with the same masks (no chunks, no grouping tricks: keys of a
grouped-query call are repeated) and averages the normalised entropy and the first key's mass
over the queries that may see at least two keys.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from lightning_attn.core.statistics import HeadStats, RecordingConfig, block_stats

#: Test models' attention is recorded in chunks this small (several chunks per call).
SMALL_CHUNKS = RecordingConfig(histogram_bins=0, head_chunk_elements=64)


@contextlib.contextmanager
def captured_sdpa() -> Iterator[list[dict]]:
    """Every ``F.scaled_dot_product_attention`` call made inside, in call order."""
    calls: list[dict] = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False):
        calls.append({"q": q.detach().clone(), "k": k.detach().clone(), "causal": is_causal,
                      "mask": None if attn_mask is None else attn_mask.detach().clone(),
                      "scale": scale})
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


def oracle_heads(call: Mapping, hidden_below: float = -1e4,
                 queries: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Per head: ``count``, ``entropy``, ``sink``, ``max_logit`` of one caught call; a float
    mask entry at or below ``hidden_below`` hides its key; ``queries (B, Nq)``: the query rows
    that exist (default: all)."""
    q, k = call["q"].double(), call["k"].double()
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = call["scale"] if call["scale"] is not None else q.shape[-1] ** -0.5
    logits = q @ k.transpose(-1, -2) * scale
    visible = torch.ones(logits.shape, dtype=torch.bool)
    mask = call["mask"]
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    elif mask is not None:
        visible = visible & (mask > hidden_below)
        logits = logits + mask.double().masked_fill(mask <= hidden_below, 0.0)
    if call["causal"]:
        visible = visible & torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
    if queries is not None:
        visible = visible & queries[:, None, :, None]
    logits = logits.masked_fill(~visible, -math.inf)
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    keys = visible.sum(-1)
    counted = keys >= 2
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1) / keys.clamp_min(2).double().log()
    out = []
    for h in range(logits.shape[1]):
        rows = counted[:, h]
        out.append({
            "count": int(rows.sum()),
            "entropy": entropy[:, h][rows].mean().item() if rows.any() else math.nan,
            "sink": p[:, h, :, 0][rows].mean().item() if rows.any() else math.nan,
            "max_logit": logits[:, h].amax().item(),
        })
    return out


def head_error(stats: HeadStats, oracle: Sequence[dict[str, float]]) -> float:
    """The largest difference between recorded and oracle per-head values (counts equal):
    absolute for the entropy and sink share (in [0, 1]), relative to ``max(1, |logit|)`` for
    the max logit (a float32 logit of 40 carries 4e-6 of rounding)."""
    assert list(stats.head_count) == [o["count"] for o in oracle]
    worst = 0.0
    for h, o in enumerate(oracle):
        for got, want in ((stats.head_entropy[h], o["entropy"]), (stats.head_sink[h], o["sink"]),
                          (stats.head_max_logit[h], o["max_logit"])):
            worst = max(worst, abs(got - want) / max(1.0, abs(want)))
    return worst


def read_heads(blocks: Mapping) -> dict[str, HeadStats]:
    return {name: block_stats(b.statistics_layout, b.recorded_statistics().tolist()).heads
            for name, b in blocks.items()}


def compare(stats: Mapping[str, HeadStats], calls: Sequence[Mapping],
            hidden_below: Callable[[str], float] = lambda name: -1e4) -> float:
    """The worst error over every block; the blocks' order is the calls' (one call each);
    ``hidden_below(block)``: the oracle's threshold of a hidden key in that block's mask."""
    assert len(calls) == len(stats), (len(calls), list(stats))
    return max(head_error(s, oracle_heads(c, hidden_below(name)))
               for (name, s), c in zip(stats.items(), calls, strict=True))


def sharpen(model: torch.nn.Module, factor: float = 6.0) -> torch.nn.Module:
    """Scale the query and key projections: attention far from uniform (random init is
    nearly uniform), so the statistics are not all near 1 and 1/N."""
    names = ("qkv.weight", "q_proj.weight", "k_proj.weight", "query.weight", "key.weight",
             "in_proj_weight", "q.weight", "k.weight", "kv.weight", "query.proj.weight",
             "key.proj.weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(names):
                p.mul_(factor)
    return model
