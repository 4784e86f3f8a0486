"""Transformer attention measures its heads without a change to the model: timm's ViT, EVA
(rotary) and Swin (windows, relative position bias), nn.MultiheadAttention and
nn.TransformerEncoder, Hugging Face's Llama (causal, grouped-query, rotary), BERT (padded) and
ViT, and a user's own module with one call. Each head's normalised entropy, max logit and
sink share equal a float64 oracle (the materialised softmax of what the model hands
``F.scaled_dot_product_attention``) to 1e-6, eager and compiled; the model's outputs, state
dict and the attention registry are as they were."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

from lightning_attn.blocks.discovery import find_attention_blocks
from lightning_attn.blocks.heads import HeadRecorder, HeadRecordingMixin

from . import head_models as models
from .head_oracle import SMALL_CHUNKS, captured_sdpa, compare, oracle_heads, read_heads

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-6


def _watch(model: nn.Module) -> dict:
    blocks, _ = find_attention_blocks(nn.ModuleList([model]), third_party=True)
    for b in blocks.values():
        b.configure_recording(SMALL_CHUNKS, "cpu")
    return blocks


def _recorded(model: nn.Module, run) -> tuple[dict, list, object]:
    """Record one forward of ``run()`` with every head block of ``model`` watched: the
    statistics, the oracle's caught SDPA calls, the output."""
    blocks = _watch(model)
    try:
        for b in blocks.values():
            b.start_recording()
        with captured_sdpa() as calls, torch.no_grad():
            out = run()
        return read_heads(blocks), calls, out
    finally:
        for b in blocks.values():
            b.clear_recording()


def _mha(**kwargs) -> nn.MultiheadAttention:
    return models.sharpen(nn.MultiheadAttention(16, 4, **kwargs))


_G = torch.Generator().manual_seed(1)
_SEQ = torch.randn(3, 7, 16, generator=_G)
_IMAGES = torch.randn(2, 3, 32, 32, generator=_G)
_QUERIES, _KEYS = torch.randn(5, 2, 16, generator=_G), torch.randn(9, 2, 12, generator=_G)
_PAD = models.padding(3, 7, {1: 2})
_CAUSAL = torch.ones(7, 7, dtype=torch.bool).triu(1)  # MHA: True hides
_TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))


def _case(build, call, hidden_below=-1e4):
    return build, call, hidden_below


#: name -> (build, forward of the built model, the oracle's threshold of a hidden key). The
#: models stay in training mode (no dropout in them): PyTorch's inference fast paths of
#: nn.MultiheadAttention would not call SDPA, where the oracle reads its inputs.
CASES = {
    "timm vit": _case(models.timm_vit, lambda m: m(_IMAGES)),
    "timm eva02 (rotary)": _case(models.timm_eva, lambda m: m(_IMAGES[..., :28, :28])),
    "timm swin (windows)": _case(models.timm_swin, lambda m: m(_IMAGES),
                                 models.SWIN_HIDDEN_BELOW),
    "timm cait class attention (SDPA)": _case(models.timm_class_attention,
                                              lambda m: m(_SEQ[:2, :, :].repeat(1, 1, 2))),
    "timm pvt_v2 spatial reduction (SDPA)": _case(
        models.timm_spatial_reduction, lambda m: m(_SEQ[:2, :4].repeat(1, 4, 2), [4, 4])),
    "timm mobilenetv4 multi-query (SDPA)": _case(models.timm_multi_query,
                                                 lambda m: m(_IMAGES[:, :1].repeat(1, 32, 1, 1)[
                                                     ..., :8, :8])),
    "mha padded causal": _case(lambda: _mha(batch_first=True), lambda m: m(
        _SEQ, _SEQ, _SEQ, key_padding_mask=_PAD, attn_mask=_CAUSAL, need_weights=False)),
    "mha cross kdim": _case(lambda: _mha(kdim=12, vdim=12), lambda m: m(
        _QUERIES, _KEYS, _KEYS, need_weights=False)),
    "mha bias_kv zero_attn": _case(
        lambda: _mha(add_bias_kv=True, add_zero_attn=True, batch_first=True),
        lambda m: m(_SEQ, _SEQ, _SEQ, key_padding_mask=_PAD, need_weights=False)),
    "transformer encoder": _case(lambda: models.encoder(2),
                                 lambda m: m(_SEQ, src_key_padding_mask=_PAD)),
    "llama causal gqa": _case(models.llama, lambda m: m(input_ids=_TOKENS)),
    "llama left-padded": _case(models.llama, lambda m: m(
        input_ids=_TOKENS, attention_mask=(~models.padding(2, 9, {0: 3}, left=True)).long())),
    "bert padded": _case(models.bert, lambda m: m(
        input_ids=_TOKENS, attention_mask=(~models.padding(2, 9, {1: 4})).long())),
    "hf vit": _case(models.hf_vit, lambda m: m(pixel_values=_IMAGES[..., :16, :16])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_head_statistics_equal_the_float64_oracle(name):
    build, call, hidden_below = CASES[name]
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        reference = call(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stats, calls, out = _recorded(model, lambda: call(model))
    error = compare(stats, calls, lambda block: hidden_below)
    assert error < TOLERANCE, error
    for s in stats.values():  # attention far from uniform, queries counted
        assert min(s.head_count) > 0 and s.entropy_min < 0.97 and s.max_logit > 1.0
    # the model computes and holds what it did: outputs, parameters, hooks, registry
    got = out if isinstance(out, torch.Tensor) else out[0]
    want = reference if isinstance(reference, torch.Tensor) else reference[0]
    assert torch.equal(got, want)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    _assert_registry_restored()


def _assert_registry_restored():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    assert not hasattr(modeling_llama.eager_attention_forward, "__wrapped__")


def test_timm_attention_honours_its_mask_and_causal_arguments():
    from timm.layers.attention import Attention

    torch.manual_seed(0)
    attention = models.sharpen(Attention(24, num_heads=3, qk_norm=True,
                                         norm_layer=nn.LayerNorm))
    x = torch.randn(2, 6, 24)
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[..., 0] = True  # every query sees a key
    for kwargs in ({"attn_mask": mask}, {"is_causal": True}):
        stats, calls, _ = _recorded(attention, lambda kw=kwargs: attention(x, **kw))
        assert compare(stats, calls) < TOLERANCE
    causal = stats["0"]
    assert causal.head_count == (2 * 5,) * 3  # the first query sees one key: not counted


def test_nested_encoder_path_counts_only_real_queries():
    """Validation of an nn.TransformerEncoder with a padding mask (eval, no grad) runs its
    nested-tensor path: no padded position exists there, and none is counted."""
    torch.manual_seed(0)
    encoder = models.encoder(1).eval()
    with torch.enable_grad(), captured_sdpa() as calls:  # the regular path, as the oracle
        encoder.train()(_SEQ, src_key_padding_mask=_PAD)
    encoder.eval()
    stats, _, out = _recorded(encoder, lambda: encoder(_SEQ, src_key_padding_mask=_PAD))
    (s,) = stats.values()
    oracle = oracle_heads(calls[0], queries=~_PAD)
    assert [o["count"] for o in oracle] == list(s.head_count) == [int((~_PAD).sum())] * 4
    for h, o in enumerate(oracle):
        for got, want in ((s.head_entropy[h], o["entropy"]), (s.head_sink[h], o["sink"]),
                          (s.head_max_logit[h], o["max_logit"])):
            assert got == pytest.approx(want, abs=TOLERANCE)
    with torch.no_grad():  # the regular path's kernels: the same attention
        plain = encoder(_SEQ, src_key_padding_mask=_PAD)
    assert torch.allclose(out.to_padded_tensor(0.0) if out.is_nested else out, plain,
                          atol=1e-5)


def test_eager_implementation_and_returned_weights_agree():
    """Llama with attn_implementation="eager" (its modeling file's eager_attention_forward,
    wrapped): the entropy and sink share of the weights it returns; the max logits as through
    sdpa."""
    torch.manual_seed(0)
    model = models.llama(layers=2)
    mask = (~models.padding(2, 9, {0: 3}, left=True)).long()
    sdpa, _, _ = _recorded(model, lambda: model(input_ids=_TOKENS, attention_mask=mask))
    model.set_attn_implementation("eager")
    eager, _, out = _recorded(model, lambda: model(input_ids=_TOKENS, attention_mask=mask,
                                                   output_attentions=True))
    keys = (torch.ones(9, 9, dtype=torch.bool).tril() & mask.bool()[:, None, :]).sum(-1)
    rows = keys >= 2  # (B, N): causal and left padding
    for (name, s), weights in zip(eager.items(), out.attentions, strict=True):
        p = weights.double()
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1) / keys.clamp_min(2).double().log()[
            :, None]
        for h in range(p.shape[1]):
            assert s.head_count[h] == int(rows.sum())
            assert s.head_entropy[h] == pytest.approx(entropy[:, h][rows].mean().item(),
                                                      abs=1e-6)
            assert s.head_sink[h] == pytest.approx(p[:, h, :, 0][rows].mean().item(), abs=1e-6)
        # the same projections; a later layer's inputs differ by float32 rounding between
        # the two implementations of the layers before
        assert s.head_max_logit == pytest.approx(sdpa[name].head_max_logit, rel=1e-6)
    _assert_registry_restored()


def test_two_consumers_of_one_transformers_module_both_record():
    """Two callbacks watching one model each get every forward; the registry is restored
    when the last one stops."""
    torch.manual_seed(0)
    model = models.llama()
    first, second = _watch(model), _watch(model)
    try:
        for b in (*first.values(), *second.values()):
            b.start_recording()
        with torch.no_grad():
            model(input_ids=_TOKENS)
        a, b = read_heads(first), read_heads(second)
        assert list(a) == list(b) and a == b and all(s.head_count[0] > 0 for s in a.values())
        for recorder in first.values():
            recorder.clear_recording()
        with torch.no_grad():
            model(input_ids=_TOKENS)
        assert {n: r.recorded_statistics()[0].item() for n, r in second.items()} == {
            n: 2.0 for n in second}
    finally:
        for recorder in (*first.values(), *second.values()):
            recorder.clear_recording()
    _assert_registry_restored()


def test_multihead_attention_weights_it_returns_agree():
    """nn.MultiheadAttention's default call (need_weights=True: no SDPA) against the per-head
    weights it returns."""
    torch.manual_seed(0)
    mha = _mha()
    x = torch.randn(7, 3, 16)
    stats, _, (_, weights) = _recorded(mha, lambda: mha(x, x, x, average_attn_weights=False))
    (s,) = stats.values()
    p = weights.double()
    entropy = (-(p * p.clamp_min(1e-300).log()).sum(-1) / math.log(7)).mean(dim=(0, 2))
    assert s.head_entropy == pytest.approx(tuple(entropy.tolist()), abs=1e-6)
    assert s.head_sink == pytest.approx(tuple(p[..., 0].mean(dim=(0, 2)).tolist()), abs=1e-6)


def test_compiled_five_transformers_record_the_oracle_with_one_extra_graph():
    """The five attentions in one model, under torch.compile(fullgraph=True) with aot_eager:
    no graph break, one graph without and one with recording (none per logging step), the
    statistics of every logging step equal the oracle's; the per-step max logits a logit clip
    reads are tracked on every step, with no further graph."""
    _compiled_matches_oracle("aot_eager")


@pytest.mark.slow
def test_inductor_five_transformers_record_the_oracle():
    _compiled_matches_oracle("inductor")


def _compiled_matches_oracle(backend: str) -> None:
    torch.manual_seed(0)
    model = models.FiveTransformers()  # training mode: no dropout, no inference fast path
    blocks = _watch(model)
    try:
        for b in blocks.values():
            b.track_max_logits("clip")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for step in range(4):  # a logging step every other step
            logging = step % 2 == 1
            inputs = models.FiveTransformers.inputs(seed=step)
            for b in blocks.values():
                b.stop_recording()
            with captured_sdpa() as calls, torch.no_grad():
                model(**inputs)  # the oracle's calls, eagerly, recording nothing
            for b in blocks.values():
                b.reset_max_logits()
                if logging:
                    b.start_recording()
            with torch.no_grad():
                compiled(**inputs)
            oracle = {name: oracle_heads(c, models.hidden_below(name))
                      for name, c in zip(blocks, calls, strict=True)}
            for name, b in blocks.items():
                want = torch.tensor([o["max_logit"] for o in oracle[name]], dtype=torch.float64)
                assert torch.allclose(b.tracked_max_logits.double(), want, atol=1e-4), name
            if logging:
                assert compare(read_heads(blocks), calls, models.hidden_below) < TOLERANCE
        assert counter.frame_count == 2
        assert torch._dynamo.utils.counters["graph_break"] == {}
    finally:
        for b in blocks.values():
            b.clear_recording()


def test_sdpa_seam_compiles_with_one_extra_graph():
    """timm's fused attention paths are read at their SDPA call (a stack of the watched
    modules running, pushed by their hooks): traced by dynamo without a break."""
    torch.manual_seed(0)
    module = models.timm_class_attention()
    x = _SEQ[:2].repeat(1, 1, 2)
    blocks = _watch(module)
    try:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(module, backend=counter, fullgraph=True)
        for step in range(4):
            for b in blocks.values():
                b.stop_recording()
            with captured_sdpa() as calls, torch.no_grad():
                module(x)  # eager, for the oracle, recording nothing
            for b in blocks.values():
                if step % 2:
                    b.start_recording()
            with torch.no_grad():
                compiled(x)
        assert compare(read_heads(blocks), calls) < TOLERANCE
        assert counter.frame_count == 2
        assert torch._dynamo.utils.counters["graph_break"] == {}
    finally:
        for b in blocks.values():
            b.clear_recording()


class GroupedAttention(HeadRecordingMixin, nn.Module):
    """A user's grouped-query attention: one call records its heads."""

    def __init__(self, dim: int = 24, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        self.record_heads(q, k, mask=mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, n, -1)


def test_a_users_attention_records_with_one_call():
    torch.manual_seed(0)
    model = models.sharpen(nn.Sequential(GroupedAttention()))
    model[0].q.weight.data.mul_(6)
    x = torch.randn(2, 5, 24)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    blocks, _ = find_attention_blocks(model)  # its own block: no third_party needed
    assert list(blocks) == ["0"] and blocks["0"] is model[0]
    stats, calls, _ = _recorded(model, lambda: model[0](x, mask))
    assert compare(stats, calls) < TOLERANCE
    wrong = GroupedAttention()
    wrong.num_heads = 3
    wrong.configure_recording(SMALL_CHUNKS, "cpu")
    wrong.start_recording()
    with pytest.raises(ValueError, match="records 4 heads, but num_heads=3"):
        wrong.record_heads(torch.randn(1, 4, 5, 6), torch.randn(1, 2, 5, 6))


def test_a_deep_copy_of_the_model_records_nothing():
    """An EMA or deep copy carries the hooks; they record only for the module they were
    attached to."""
    torch.manual_seed(0)
    model = models.timm_vit(depth=1)
    blocks = _watch(model)
    try:
        twin = copy.deepcopy(model)
        for b in blocks.values():
            b.start_recording()
        with torch.no_grad():
            twin(torch.randn(2, 3, 32, 32))
        (recorder,) = blocks.values()
        assert isinstance(recorder, HeadRecorder)
        assert recorder.recorded_statistics()[0].item() == 0  # no forward recorded
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
        assert recorder.recorded_statistics()[0].item() == 1
    finally:
        for b in blocks.values():
            b.clear_recording()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointing_records_each_head_forward_once(reentrant):
    """timm's gradient checkpointing reruns every block in the backward pass: the heads'
    statistics are those of the same step without checkpointing (the rerun records
    nothing)."""
    torch.manual_seed(0)
    model = models.timm_vit()
    x = torch.randn(2, 3, 32, 32)

    def step(checkpointing: bool) -> dict:
        model.set_grad_checkpointing(checkpointing)
        if checkpointing:  # timm's checkpoint_seq passes use_reentrant through
            model.blocks = nn.Sequential(*[_Checkpointed(b, reentrant) for b in model.blocks])
        blocks = _watch(model)
        try:
            for b in blocks.values():
                b.start_recording()
            model(x).sum().backward()
            return {n: s.head_count for n, s in read_heads(blocks).items()}
        finally:
            for b in blocks.values():
                b.clear_recording()
            if checkpointing:
                model.blocks = nn.Sequential(*[b.block for b in model.blocks])

    plain = step(False)
    assert plain and all(sum(c) > 0 for c in plain.values())
    rerun = step(True)
    assert {n.replace(".block.", "."): c for n, c in rerun.items()} == plain


class _Checkpointed(nn.Module):
    def __init__(self, block: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("name", ["timm vit", "llama causal gqa", "bert padded", "hf vit"])
def test_captured_first_query_attention_equals_the_float64_softmax(name):
    """While capture is held (the attention-map images), each head block keeps the first
    query's attention over the keys, averaged over the heads: the oracle's materialised
    softmax (masks honoured: a causal first query sees the first key only)."""
    build, call, hidden_below = CASES[name]
    torch.manual_seed(0)
    model = build()
    blocks, _ = find_attention_blocks(nn.ModuleList([model]), third_party=True)
    try:
        for block in blocks.values():
            block.start_capture("test")
        with torch.no_grad(), captured_sdpa() as calls:
            call(model)
        captured = [b.captured_query_attention for b in blocks.values()]
        for block in blocks.values():
            block.stop_capture("test")
        assert all(b.captured_query_attention is None for b in blocks.values())
    finally:
        for block in blocks.values():
            block.clear_recording()
    assert len(captured) == len(calls) and captured
    for got, sdpa in zip(captured, calls, strict=True):
        q, k = sdpa["q"].double()[:, :, :1], sdpa["k"].double()
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = q @ k.transpose(-1, -2) * (sdpa["scale"] or q.shape[-1] ** -0.5)
        mask = sdpa["mask"]
        if mask is not None:
            mask = mask[..., :1, :]
            hidden = ~mask if mask.dtype == torch.bool else mask <= hidden_below
            added = 0.0 if mask.dtype == torch.bool else mask.double().masked_fill(hidden, 0.0)
            logits = (logits + added).masked_fill(hidden, -math.inf)
        if sdpa["causal"]:
            logits[..., 1:] = -math.inf
        want = logits.softmax(-1).mean(dim=(1, 2))
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
        assert torch.allclose(got.sum(-1), torch.ones(got.shape[0]), atol=1e-5)
    if name == "llama causal gqa":  # the first token of a decoder sees itself only
        assert all(torch.equal(c[:, 1:], torch.zeros_like(c[:, 1:])) for c in captured)


def test_compiled_capture_keeps_the_first_query_attention_of_the_eager_forward():
    """Under torch.compile(fullgraph=True) the captured first-query attention is that of the
    eager forward: one more graph while capture is held, no break."""
    torch.manual_seed(0)
    model = models.timm_vit()
    blocks, _ = find_attention_blocks(nn.ModuleList([model]), third_party=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled(_IMAGES)  # capture off
            for block in blocks.values():
                block.start_capture("test")
            compiled(_IMAGES)
            got = [b.captured_query_attention.clone() for b in blocks.values()]
            model(_IMAGES)
            want = [b.captured_query_attention for b in blocks.values()]
    finally:
        for block in blocks.values():
            block.clear_recording()
    assert counter.frame_count == 2 and len(got) == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
