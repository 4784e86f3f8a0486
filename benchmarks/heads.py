"""Peak extra memory of the head statistics on a logging step, and QKClip's cost (not a test).

One forward+backward of ViT-Tiny (timm's ``VisionTransformer``: width 192, 12 blocks of 3
heads, random init) on a batch of images, without diagnostics (no hooks at all) and on a
logging step (every block's heads recorded through the adapters), at two sequence lengths
(224x224 and 448x448 images: 197 and 785 tokens) and two bounds on the logits the statistics
hold at once (``RecordingConfig.head_chunk_elements``). The peak is the largest amount of
memory held at any moment of the step beyond what was held before it
(:func:`benchmarks.measure.peak_bytes`: torch.profiler's allocation events on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU); the two arms alternate and each figure is the
median of ``--repeats``; the same for a forward under ``torch.no_grad`` (no activations
kept for the backward: there the statistics' temporaries are the peak's whole extra). The
extra is set against the logits of one block if they were held
whole: ``batch x heads x N x N`` in float64, the statistics' precision.

    python benchmarks/heads.py [--batch 8] [--repeats 3] [--device cuda]
    python benchmarks/heads.py --sizes --qkclip-steps 100       # QKClip's cost only

Then QKClip's cost per step (:func:`qkclip_cost`): the max-logit tracking in the forward and
the clip after the optimizer step, each against a plain training step of the same run.

What the extra is made of: float64 copies of one block's queries and keys, and a few
temporaries of one chunk of logits (logits, probabilities, their logarithms); the block's
statistics are sums of a few values per head. It does not grow with the depth (each block's
temporaries are freed before the next block runs) and, past the chunk, not with ``N x N``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.measure import attached_blocks, peak_bytes  # noqa: E402
from lightning_attn.core.statistics import HEAD_CHUNK_ELEMENTS, RecordingConfig  # noqa: E402

#: Image sizes (tokens: (size / 16) ** 2 + 1) and chunk bounds measured by default.
SIZES = (224, 448)
CHUNKS = (2**18, HEAD_CHUNK_ELEMENTS)
MiB = 2**20


def vit_tiny(img_size: int) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=16, embed_dim=192, depth=12,
                             num_heads=3, num_classes=10)


def measure(size: int, chunk: int, batch: int, repeats: int, device: torch.device) -> dict:
    """Peak bytes of a step without diagnostics and of a logging step, medians."""
    model = vit_tiny(size).to(device)
    x = torch.randn(batch, 3, size, size, device=device)

    def step() -> None:
        model.zero_grad(set_to_none=False)
        model(x).square().mean().backward()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    peaks: dict[bool, list[int]] = {False: [], True: []}
    forward_peaks: dict[bool, list[int]] = {False: [], True: []}
    config = RecordingConfig(head_chunk_elements=chunk)
    for i in range(2 * repeats):
        logging_step = i % 2 == 1
        with (attached_blocks(model, config, device, record=True) if logging_step
              else contextlib.nullcontext()):
            peaks[logging_step].append(peak_bytes(step, x))
            forward_peaks[logging_step].append(peak_bytes(forward, x))
    tokens = (size // 16) ** 2 + 1
    heads = model.blocks[0].attn.num_heads
    rows = max(1, min(tokens, chunk // (batch * heads * tokens)))
    return {
        "size": size, "tokens": tokens, "chunk": chunk, "rows": rows,
        "without": statistics.median(peaks[False]), "logging": statistics.median(peaks[True]),
        "forward_without": statistics.median(forward_peaks[False]),
        "forward_logging": statistics.median(forward_peaks[True]),
        "chunk_bytes": batch * heads * rows * tokens * 8,
        "whole_bytes": batch * heads * tokens * tokens * 8,
        "qk_bytes": 2 * batch * tokens * model.embed_dim * 8,
    }


def qkclip_cost(steps: int, device: torch.device) -> dict[str, float]:
    """QKClip's cost on ViT-Tiny (65 tokens of 32x32 images, batch 8, SGD): medians of
    training steps with the heads' max-logit tracking on and off, alternating step by step,
    and of :meth:`QKClip.clip` (the rescale after the optimizer step: one vector of every
    head's max logit, a few in-place multiplies per module), in milliseconds."""
    import time

    import lightning.pytorch as pl
    import torch.nn.functional as F

    from benchmarks.callback_overhead import vit_tiny as small_vit_tiny
    from lightning_attn.callbacks import QKClip

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.vit = small_vit_tiny()

    module = Module().to(device)
    x = torch.rand(8, 1, 32, 32, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    clip = QKClip()
    clip.on_fit_start(None, module)
    blocks = [block for block, _ in clip._blocks.values()]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        sync()
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(module.vit(x), y).backward()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        for i in range(2 * steps + 4):
            tracking = i % 2 == 1
            for block in blocks:
                (block.track_max_logits if tracking else block.untrack_max_logits)(clip)
            seconds = step()
            if i >= 4:  # warm
                times[tracking].append(seconds)
        clips = []
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            clip.clip()
            sync()
            clips.append(time.perf_counter() - start)
    finally:
        clip.teardown(None, module, "fit")
    return {"step": 1e3 * statistics.median(times[False]),
            "tracked": 1e3 * statistics.median(times[True]),
            "clip": 1e3 * statistics.median(clips)}


def _power(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qkclip-steps", type=int, default=60,
                        help="steps of each kind for QKClip's cost (0: not measured)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    lines = [
        f"ViT-Tiny (12 blocks of 3 heads), batch {args.batch}, one forward+backward, "
        f"{device.type}, torch {torch.__version__}; medians of {args.repeats}; {load} at "
        "the start",
        "",
        "| image (tokens) | head_chunk_elements (queries a chunk) | peak without diagnostics "
        "| peak on a logging step | extra | extra, no-grad forward | one chunk of logits "
        "| q, k in float64 | one block's logits whole |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in args.sizes:
        for chunk in args.chunks:
            r = measure(size, chunk, args.batch, args.repeats, device)
            extra = r["logging"] - r["without"]
            forward_extra = r["forward_logging"] - r["forward_without"]
            lines.append(
                f"| {size}x{size} ({r['tokens']}) | {_power(chunk)} ({r['rows']}) "
                f"| {r['without'] / MiB:.0f} MiB | {r['logging'] / MiB:.0f} MiB "
                f"| {extra / MiB:.1f} MiB ({100 * extra / r['without']:.1f} %) "
                f"| {forward_extra / MiB:.1f} MiB "
                f"| {r['chunk_bytes'] / MiB:.1f} MiB | {r['qk_bytes'] / MiB:.1f} MiB "
                f"| {r['whole_bytes'] / MiB:.1f} MiB |")
            print(lines[-1], flush=True)
    if args.qkclip_steps:
        start_load = f"load average {os.getloadavg()[0]:.1f}"
        c = qkclip_cost(args.qkclip_steps, device)
        lines.append(
            f"\nQKClip on ViT-Tiny (65 tokens, batch 8; medians of {args.qkclip_steps} steps of "
            f"each kind, alternating; {start_load} at its start): a training step "
            f"{c['step']:.1f} ms without the max-logit tracking, {c['tracked']:.1f} ms with it "
            f"({100 * (c['tracked'] / c['step'] - 1):+.1f} %); the clip after the optimizer "
            f"step {c['clip']:.2f} ms ({100 * c['clip'] / c['step']:.1f} % of a step)")
        print(lines[-1], flush=True)
    lines.append(f"\n{load} at the end")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
