"""Short block names: cut at one place for every name, unique, and one home for the table, the map
grid and the report."""

from lightning_attn.core.presentation import short_names


def test_short_names_drop_the_shared_prefix_at_one_depth():
    assert short_names(["a.b.attn1.block", "a.b.attn2.block"]) == {
        "a.b.attn1.block": "attn1.block", "a.b.attn2.block": "attn2.block"}
    # EfficientNet's SE gates: one depth, never "3.se" beside "5.2.se"
    names = ["net.blocks.5.2.se", "net.blocks.5.3.se", "net.blocks.6.0.se"]
    assert list(short_names(names).values()) == ["5.2.se", "5.3.se", "6.0.se"]


def test_short_names_keep_two_parts_and_stay_unique():
    assert short_names(["dsa"]) == {"dsa": "dsa"}
    assert short_names(["net.features.attn1.block"]) == {
        "net.features.attn1.block": "attn1.block"}
    assert list(short_names(["x.attn", "y.attn"]).values()) == ["x.attn", "y.attn"]
    names = ["m.a.b.c.attn", "m.x.c.attn", "m.y.attn"]
    assert list(short_names(names).values()) == ["a.b.c.attn", "x.c.attn", "y.attn"]
