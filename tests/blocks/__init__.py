"""Tests of ``lightning_attn.blocks`` (a package so helper modules import relatively)."""
