"""The census: every attention-like class of PyTorch, timm, torchvision and transformers is
diagnosed or declared with the reason why not; the declarations name real classes; matching by
class name never catches a same-named class of another module; the coverage docs are what the
script writes; a model holding attention the diagnostics cannot measure is named."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
from torch import nn

from lightning_attn.blocks.census import (
    ATTENTION_LIKE,
    NOT_DIAGNOSED,
    UNSUPPORTED,
    census,
    unseen_attention,
)
from lightning_attn.blocks.discovery import find_attention_blocks
from lightning_attn.blocks.heads import HeadRecorder

timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def _rows() -> dict[str, object]:
    return {row.target: row for row in census()}


def test_every_attention_like_class_is_diagnosed_or_declared_with_why():
    rows = _rows()
    unknown = [t for t, r in rows.items() if r.status == "unknown"]
    assert not unknown, f"neither diagnosed nor in NOT_DIAGNOSED / TRANSFORMERS_RULES: {unknown}"
    assert all(r.how for r in rows.values())  # each verdict says how, or why not
    diagnosed = {
        "timm.layers.attention:Attention", "timm.layers.attention:AttentionRope",
        "timm.models.eva:EvaAttention", "timm.models.swin_transformer:WindowAttention",
        "timm.layers.global_context:GlobalContext", "timm.layers.non_local_attn:NonLocalAttn",
        "timm.layers.non_local_attn:BatNonLocalAttn", "timm.layers.coord_attn:SimpleCoordAttn",
        "timm.layers.coord_attn:EfficientLocalAttn", "timm.layers.coord_attn:StripAttn",
        "timm.models.senet:SEModule", "timm.models.hgnet:EseModule",
        "timm.models.ghostnet:GhostModuleV2", "timm.models.ghostnet:GhostModuleV3",
        "timm.models.cait:ClassAttn", "timm.models.pvt_v2:Attention",
        "torch.nn.modules.activation:MultiheadAttention",
        "torchvision.ops.misc:SqueezeExcitation",
        "transformers.models.llama.modeling_llama:LlamaAttention",
        "transformers.models.bert.modeling_bert:BertSelfAttention",
        "transformers.models.vit.modeling_vit:ViTAttention",
    }
    assert {t for t in diagnosed if rows[t].status != "diagnosed"} == set()
    verdicts = {
        "timm.models.cait:TalkingHeadAttn": UNSUPPORTED,
        "timm.models.senet:SENet": "holds attention",
        "torchvision.models.squeezenet:SqueezeNet": "not attention",
        "transformers.models.bloom.modeling_bloom:BloomAttention": UNSUPPORTED,
        "transformers.models.bert.modeling_bert:BertAttention": "holds attention",
        "transformers.models.gpt_oss.modeling_gpt_oss:GptOssAttention": UNSUPPORTED,
    }
    assert {t: rows[t].status for t in verdicts} == verdicts
    assert "s_aux" in rows["transformers.models.gpt_oss.modeling_gpt_oss:GptOssAttention"].how


def test_every_declared_class_exists_and_is_not_also_diagnosed():
    rows = _rows()
    for entry in NOT_DIAGNOSED:
        module, name = entry.target.split(":")
        assert isinstance(getattr(importlib.import_module(module), name), type), entry.target
        assert ATTENTION_LIKE.search(name), entry.target  # the census would not reach it
        assert rows[entry.target].status == entry.kind, entry.target  # no adapter matches it
    assert len({e.target for e in NOT_DIAGNOSED}) == len(NOT_DIAGNOSED)


def test_the_coverage_docs_are_what_the_script_writes():
    spec = importlib.util.spec_from_file_location("coverage_table",
                                                  ROOT / "scripts" / "coverage_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for path, text in script.documents().items():
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} is stale: run .venv/bin/python scripts/coverage_table.py")


class SEModule(nn.Module):
    """Named like timm's squeeze-excite gates, from another module: no adapter catches it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(x)


class WindowAttention(nn.Module):
    """Named like Swin's window attention, from another module."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.qkv = 2, nn.Linear(4, 12)

    def forward(self, x):
        return self.qkv(x)


def test_class_names_match_only_their_own_module():
    from timm.layers.squeeze_excite import SEModule as TimmSE

    class MyTimmSE(TimmSE):  # a subclass is meant to be caught: it is timm's gate
        pass

    model = nn.Sequential(SEModule(), WindowAttention(), TimmSE(8), MyTimmSE(8))
    blocks, _ = find_attention_blocks(model, third_party=True)
    try:
        assert sorted(blocks) == ["2", "3"]
        unseen = unseen_attention(model, [b.module for b in blocks.values()])
        # the look-alikes are named as attention the diagnostics do not know
        assert set(unseen) == {"SEModule", "WindowAttention"}
        assert "do not know" in unseen["SEModule"][0] and unseen["SEModule"][1] == ["0"]
    finally:
        for b in blocks.values():
            b.clear_recording()


def test_a_model_with_unsupported_attention_is_named_with_why():
    from timm.models.cait import TalkingHeadAttn
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32))
    bert.config._attn_implementation = "flex_attention"  # not read: named with what it needs
    model = nn.ModuleDict({"vit": timm.create_model("vit_tiny_patch16_224", img_size=32,
                                                    patch_size=16, depth=1),
                           "talking": TalkingHeadAttn(16, num_heads=2), "bert": bert})
    blocks, _ = find_attention_blocks(model, third_party=True)
    try:
        assert [type(b) for b in blocks.values()] == [HeadRecorder]  # the ViT's attention
        unseen = unseen_attention(model, [b.module for b in blocks.values()])
        assert set(unseen) == {"TalkingHeadAttn", "BertSelfAttention"}
        assert "talking heads" in unseen["TalkingHeadAttn"][0]
        why, names = unseen["BertSelfAttention"]
        assert "'flex_attention'" in why and names == ["bert.encoder.layer.0.attention.self"]
        # a watched module's parts and containers are not named again
        assert not unseen_attention(model["vit"], [b.module for b in blocks.values()])
    finally:
        for b in blocks.values():
            b.clear_recording()
