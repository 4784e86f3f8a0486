"""The README's "Add it to your Trainer" example runs as written and logs the documented tags."""

from __future__ import annotations

import re
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("## Add it to your Trainer"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_trainer_example_runs_and_logs_documented_tags(tmp_path, monkeypatch):
    code = _example()
    # Smaller run, same code: fewer samples, fewer epochs.
    code = code.replace("max_epochs=2", "max_epochs=1, enable_progress_bar=False")
    code = code.replace("num_train=1000, num_val=200", "num_train=160, num_val=64, batch_size=16")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})

    (event_file,) = (tmp_path / "lightning_logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file.parent), size_guidance={"images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "attn/attn/router/entropy", "attn/attn/router/entropy_norm", "attn/attn/router/usage_0",
        "attn/attn/mask/mean", "attn/attn/mask/std", "attn/attn/mask/sat_low",
        "attn/attn/mask/sat_high", "attn/attn/param/temperature",
        "attn/attn/param/temperature_grad_norm",
    ):
        assert tag in scalars, (tag, sorted(scalars))
    assert acc.Tags()["images"], "the attention-map grid is missing"
