"""Tiny real transformers (random init; nothing downloads) for the head statistics' tests:
timm's ViT, EVA (rotary) and Swin (windows, relative position bias, shifted-window mask),
PyTorch's nn.MultiheadAttention / nn.TransformerEncoder, and Hugging Face's Llama (causal,
grouped-query, rotary), BERT (padded encoder) and ViT."""

from __future__ import annotations

import torch
from torch import nn

from .head_oracle import sharpen

#: Swin's shifted-window mask hides a key with -100 (not -inf): what the oracle reads as hidden.
SWIN_HIDDEN_BELOW = -50.0


def timm_vit(depth: int = 2) -> nn.Module:
    import timm

    return sharpen(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                     depth=depth))


def timm_eva(depth: int = 2) -> nn.Module:
    import timm

    return sharpen(timm.create_model("eva02_tiny_patch14_224", img_size=28, patch_size=7,
                                     depth=depth))


def timm_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    swin = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16,
                           depths=(2,), num_heads=(2,), num_classes=4, drop_path_rate=0.0)
    for module in swin.modules():  # SDPA, so the oracle sees what the softmax sees
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return sharpen(swin, 40.0)


def timm_class_attention() -> nn.Module:
    from timm.models.cait import ClassAttn

    return sharpen(ClassAttn(32, num_heads=4))


def timm_spatial_reduction() -> nn.Module:
    from timm.models.pvt_v2 import Attention

    return sharpen(Attention(32, num_heads=4, sr_ratio=2))


def timm_multi_query() -> nn.Module:
    from timm.layers.attention2d import MultiQueryAttention2d

    # eval: its key/value downsampling has batch norms, whose running statistics a forward in
    # training mode would move
    return sharpen(MultiQueryAttention2d(32, num_heads=4, key_dim=8, value_dim=8,
                                         kv_stride=2)).eval()


def encoder(layers: int = 1) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return sharpen(nn.TransformerEncoder(layer, layers, enable_nested_tensor=True))


def llama(layers: int = 1) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return sharpen(LlamaForCausalLM(config), 25.0)


def bert(layers: int = 1) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return sharpen(BertModel(config, add_pooling_layer=False), 25.0)


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, image_size=16, patch_size=4)
    return sharpen(ViTModel(config, add_pooling_layer=False), 25.0)


def padding(batch: int, length: int, pads: dict[int, int], left: bool = False) -> torch.Tensor:
    """Key padding ``(batch, length)``, True where padded: ``pads`` maps a row to its padding."""
    out = torch.zeros(batch, length, dtype=torch.bool)
    for row, n in pads.items():
        if left:
            out[row, :n] = True
        else:
            out[row, length - n:] = True
    return out


class FiveTransformers(nn.Module):
    """The five attentions the head statistics must get right, in one model: timm's ViT and
    Swin, a padded nn.TransformerEncoder, a left-padded Llama (causal, grouped-query, rotary)
    and a right-padded BERT. One forward calls each attention once, in module order."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = timm_vit(depth=1)
        self.swin = timm_swin()
        self.encoder = encoder()
        self.llama = llama()
        self.bert = bert()

    @staticmethod
    def inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 64, (batch, 9), generator=g)
        return {
            "images": torch.randn(batch, 3, 32, 32, generator=g),
            "sequence": torch.randn(batch, 7, 16, generator=g),
            "sequence_padding": padding(batch, 7, {0: 2}),
            "tokens": tokens,
            "llama_mask": (~padding(batch, 9, {batch - 1: 3}, left=True)).long(),
            "bert_mask": (~padding(batch, 9, {0: 4})).long(),
        }

    def forward(self, images, sequence, sequence_padding, tokens, llama_mask, bert_mask):
        out = self.vit(images).sum() + self.swin(images).sum()
        out = out + self.encoder(sequence, src_key_padding_mask=sequence_padding).sum()
        out = out + self.llama(input_ids=tokens, attention_mask=llama_mask,
                               use_cache=False).logits.sum()
        return out + self.bert(input_ids=tokens, attention_mask=bert_mask).last_hidden_state.sum()


def hidden_below(name: str) -> float:
    """What the oracle reads as a hidden key in block ``name``'s float mask."""
    return SWIN_HIDDEN_BELOW if ".swin." in f".{name}" else -1e4
