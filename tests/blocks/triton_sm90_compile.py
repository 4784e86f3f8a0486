"""Compile the Triton kernels an H100 would launch for the benchmark shapes, for sm_90, no GPU.

Triton's interpreter (which the CPU tests use) runs the kernels' Python in numpy and never
lowers them; this script takes each kernel through Triton's real pipeline down to a cubin
(ptxas ships with triton), catching what only the compiler sees: type and layout errors,
constexpr branches, unsupported ops, and how wide the loads are.

Which kernels: the ops' own host code plans every launch of one forward+backward of each
block (linked, as the blocks call them) on ``meta`` tensors of the benchmark shapes, as on a
132-SM GPU (:func:`~lightning_attn.blocks.kernels.triton_common.plan_for_gpu`), and records
it instead of launching (:func:`~lightning_attn.blocks.kernels.triton_common.record_launches`).
Each launch is compiled with the signature Triton would give it at run time (pointers
16-byte aligned, integers specialised on divisibility by 16 and on 1) and with every
configuration it can run with: the one the rule picks for its shape class (what runs by
default) and every other of ``LAUNCH_CONFIGS`` (what opt-in autotuning may pick). So the
variants compiled are those that run at W = 56, 28, 14, 7 and 8192 (a row wider than the
GPU tile). Identical variants compile once.

Printed per variant: kernel, where it runs, its configuration (``(rule)``: the default's),
the widest global loads in its PTX in bytes: pipelined (``cp.async ... 0x10``: 16; the
full-size loads of the ``tl.range`` loops) and plain (``ld.global.v4.b32``: 16), and its
shared memory. Run by test_triton.py in a subprocess (the test process has
``TRITON_INTERPRET=1`` set and the kernels must be imported without it).

    python tests/blocks/triton_sm90_compile.py              # fp32 NCHW, W = 56, 28, 14, 7,
                                                            # 8192 (and channels_last at 7)
    python tests/blocks/triton_sm90_compile.py --rule-only  # only what runs by default
    python tests/blocks/triton_sm90_compile.py --full       # + W = 32, bf16, channels_last
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402

from lightning_attn.blocks.kernels import triton_common as common  # noqa: E402
from lightning_attn.blocks.kernels import triton_coord, triton_dsa  # noqa: E402

#: The benchmark shapes of the GPU check (W = 56, 32, 14, 7), W = 28, and rows wider than
#: the GPU tile (the "wide" shape class: CoordinateAttention at W = 8192, the widest row).
SHAPES = ((64, 256, 56, 56), (256, 64, 32, 32), (128, 512, 28, 28), (128, 1024, 14, 14),
          (8, 2048, 7, 7), (2, 16, 3, 8192))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
       torch.float64: "fp64", torch.int32: "i32"}
_LOAD = re.compile(r"ld\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[bfus](\d+)")
#: cp.async: the pipelined loads of the kernels' tl.range loops (global -> shared)
_ASYNC = re.compile(
    r"cp\.async\.\w+\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)"
)


def _meta(shape, dtype, layout=torch.contiguous_format):
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=layout)


def plan_dsa(x: torch.Tensor) -> None:
    """One linked forward+backward of DynamicSpatialAttention's ops on ``x``."""
    b, c, h, w = x.shape
    s, arg, carry_gy, carry_mask = triton_dsa._dsa_summary_impl(x)
    mask = _meta((b, 1, h, w), x.dtype)
    y = triton_dsa._dsa_apply_impl(x, mask, carry_gy, carry_mask)
    grad_y = torch.empty_like(y)
    _, _, mask_copy = triton_dsa._dsa_apply_backward_impl(grad_y, x, mask, True, True, True)
    triton_dsa._dsa_summary_backward_impl(_meta(s.shape, s.dtype), arg, x, grad_y, mask_copy)


def plan_coord(x: torch.Tensor, with_max: bool) -> None:
    """One linked forward+backward of CoordinateAttention's ops on ``x``: learnable ``k``
    and ``c`` (every reduction), and with ``with_max`` add-on 1's pooling."""
    b, c, h, w = x.shape
    x_h, x_w, stat_h, stat_w, carry_gy, carry_pieces = triton_coord._coord_pool_impl(
        x, with_max
    )
    u_h, u_w = _meta((b, c, h, 1), x.dtype), _meta((b, c, 1, w), x.dtype)
    k = _meta((), torch.float32)
    y = triton_coord._coord_scale_impl(x, u_h, u_w, k, k, 0.0, 1.0, carry_gy, carry_pieces)
    grad_y = torch.empty_like(y)
    outs = triton_coord._coord_scale_backward_impl(
        grad_y, x, u_h, u_w, k, k, 0.0, 1.0, False, True, True, True
    )
    triton_coord._coord_pool_backward_impl(
        _meta(x_h.shape, x_h.dtype), _meta(x_w.shape, x_w.dtype), x, stat_h, stat_w,
        with_max, grad_y, outs[4],
    )


def planned_launches(shape, dtype, layout, mean_max: bool = True
                     ) -> list[tuple[str, common.Launch]]:
    """Every launch of both blocks at ``shape``, as planned for a 132-SM GPU (with
    ``mean_max`` also those of CoordinateAttention's add-on 1)."""
    x = _meta(shape, dtype, layout)
    out = []
    with ExitStack() as stack:
        stack.enter_context(common.plan_for_gpu(132))
        # meta tensors are neither CUDA nor interpreted CPU tensors
        for module in (triton_dsa, triton_coord):
            old = module.check_triton_input
            module.check_triton_input = lambda *a: None
            stack.callback(setattr, module, "check_triton_input", old)
        plans = [("dsa", lambda: plan_dsa(x)), ("coord", lambda: plan_coord(x, False))]
        if mean_max:
            plans.append(("coord_mean_max", lambda: plan_coord(x, True)))
        for block, plan in plans:
            with common.record_launches() as launches:
                plan()
            out += [(block, launch) for launch in launches]
    return out


def signature_of(launch: common.Launch, config_constexprs: dict):
    """Triton's run-time specialisation of the launch with a configuration's constexprs:
    ``(signature, constants, attrs)``."""
    fn = launch.kernel
    constants = {**launch.constexprs, **config_constexprs}
    signature, attrs = {}, {}
    params = {p.name: p for p in fn.params}
    for i, (name, arg) in enumerate(zip(fn.arg_names, launch.args + (None,) * 99, strict=False)):
        if name in constants:
            signature[name] = "constexpr"
            continue
        if isinstance(arg, torch.Tensor):
            signature[name] = "*" + _TL[arg.dtype]
            if arg.storage_offset() * arg.element_size() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(arg, float):
            annotation = params[name].annotation
            signature[name] = annotation if annotation else "fp32"
        else:
            kind, key = native_specialize_impl(BaseBackend, arg, False, True, True)[:2]
            if kind == "constexpr":
                signature[name] = "constexpr"
                constants[name] = arg
            else:
                signature[name] = kind
                if key == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    constants = {k: v for k, v in constants.items() if k in fn.arg_names}
    return signature, constants, attrs


def load_widths(ptx: str) -> tuple[int, int]:
    """Bytes of the widest pipelined load (``cp.async``, 0 if none) and of the widest plain
    ``ld.global`` in ``ptx``."""
    plain = [int(v or 1) * int(bits) // 8 for v, bits in _LOAD.findall(ptx)]
    pipelined = [int(n, 0) for n in _ASYNC.findall(ptx)]
    return max(pipelined, default=0), max(plain, default=0)


def _key(signature, constants, attrs) -> tuple:
    def norm(v):
        return str(v) if isinstance(v, tl.dtype) else v

    return (tuple(sorted(signature.items())), tuple(sorted((k, norm(v)) for k, v in
                                                          constants.items())),
            tuple(sorted(attrs)))


def launch_configs(launch: common.Launch, rule_only: bool):
    """``(name, config)`` of every configuration ``launch`` can run with: the rule's
    (``"name (rule)"``) and, unless ``rule_only``, every autotune candidate; ``(None,
    None)`` for a kernel without a loop (Triton's defaults)."""
    if launch.config is None:
        return [(None, None)]
    rule = next(n for n, c in common.LAUNCH_CONFIGS.items() if c == launch.config)
    out = [(f"{rule} (rule)", launch.config)]
    if not rule_only:
        out += [(n, c) for n, c in common.LAUNCH_CONFIGS.items() if n != rule]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="fp32 and bf16, NCHW and channels_last (default: fp32 NCHW)")
    parser.add_argument("--rule-only", action="store_true",
                        help="only the configuration the rule picks (what runs by default), "
                             "not every autotune candidate too")
    parser.add_argument("--jobs", type=int, default=2, help="compilations at a time")
    args = parser.parse_args(argv)
    # Default: fp32 NCHW at one shape per width class (56, 28, 14, 7, and a row wider than
    # the GPU tile), add-on 1 at the first only, and channels_last at W = 7.
    shapes = SHAPES if args.full else tuple(s for s in SHAPES if s[3] != 32)
    all_combos = [(d, lay) for d in DTYPES for lay in LAYOUTS]
    target = GPUTarget("cuda", 90, 32)
    jobs, lines = {}, []
    for shape in shapes:
        combos = all_combos if args.full else [("fp32", "nchw")] + (
            [("fp32", "nhwc")] if shape[3] == 7 else [])
        for dtype_name, layout_name in combos:
            launches = planned_launches(shape, DTYPES[dtype_name], LAYOUTS[layout_name],
                                        mean_max=args.full or shape == shapes[0])
            for block, launch in launches:
                for name, config in launch_configs(launch, args.rule_only):
                    constexprs = config.constexprs if config else {}
                    warps = config.num_warps if config else 4
                    sig, consts, attrs = signature_of(launch, constexprs)
                    key = (launch.kernel.fn.__name__, warps, _key(sig, consts, attrs))
                    jobs[key] = (launch.kernel, sig, consts, attrs, warps)
                    lines.append((key, f"{launch.kernel.fn.__name__}: sm_90 cubin | {block} | "
                                       f"W={shape[3]} | {dtype_name} | {layout_name} | "
                                       f"{name or '-'}", f"{shape}"))

    def build(job):
        kernel, sig, consts, attrs, warps = job
        compiled = triton_compile(ASTSource(kernel, sig, consts, attrs), target=target,
                                  options={"num_warps": warps})
        assert compiled.asm.get("cubin"), kernel
        return (*load_widths(compiled.asm["ptx"]), compiled.metadata.shared)

    # Two at a time: much of a compilation (MLIR passes, ptxas) runs outside the GIL.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = dict(zip(jobs, pool.map(build, jobs.values()), strict=True))
    for key, head, tail in lines:
        pipelined, plain, shared = done[key]
        print(f"{head} | pipelined {pipelined} B | plain {plain} B | shared {shared} B | "
              f"{tail}")
    print(f"{len(done)} distinct variants compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
