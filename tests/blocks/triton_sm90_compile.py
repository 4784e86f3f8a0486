"""Compile every Triton kernel of ``backend="triton"`` for an H100 (sm_90), no GPU needed.

Triton's interpreter (which the CPU tests use) runs the kernels' Python in numpy and never
lowers them; this script takes each kernel through Triton's real pipeline down to a cubin
(ptxas ships with triton), catching what only the compiler sees: type and layout errors,
constexpr branches, unsupported ops. Run by test_triton.py in a subprocess, since the test
process has ``TRITON_INTERPRET=1`` set and the kernels must be imported without it.

    python tests/blocks/triton_sm90_compile.py   # prints one line per kernel
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402

from lightning_attn.blocks.kernels import triton_ops as T  # noqa: E402

_SIZES = ("C", "H", "W", "HW")  # divisible by 16 at the shapes of issue 9, like the strides


def compile_kernel(fn, pointers: dict, constexprs: dict, unit_strides: tuple = ()):
    """Compile ``fn`` as Triton would launch it on (64, 256, 56, 56): pointers 16-byte
    aligned, the unit strides specialised to 1, sizes and strides divisible by 16."""
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in constexprs or name in unit_strides:
            signature[name] = "constexpr"
            constants[name] = constexprs.get(name, 1)
        else:
            signature[name] = "i32"
            if name.startswith("s") or name in _SIZES:
                attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", 90, 32)
    try:
        return triton_compile(ASTSource(fn, signature, constants, attrs), target=target)
    except (TypeError, AttributeError, KeyError):
        # Triton releases spell the alignment hints differently; without them the kernel
        # still goes through the whole pipeline (only its loads are not vectorised).
        return triton_compile(ASTSource(fn, signature, constants), target=target)


def main() -> int:
    f32, acc = "fp32", tl.float32
    dsa = {"ACC": acc, "BLOCK_C": 8, "BLOCK_S": 256}
    coord = {"ACC": acc, "FOLD": False, "BLOCK_C": 32, "BLOCK_H": 1, "BLOCK_W": 64}
    jobs = [
        (T._dsa_summary_kernel, {"x_ptr": "bf16", "s_ptr": "bf16", "arg_ptr": "i32"},
         {"FLAT": True, **dsa}, ("sxw",)),
        (T._dsa_summary_backward_kernel, {"gs_ptr": f32, "arg_ptr": "i32", "gx_ptr": f32},
         {"FLAT": False, **dsa}, ("sgc",)),
        (T._dsa_apply_kernel, {"x_ptr": f32, "m_ptr": "bf16", "y_ptr": f32},
         {"FLAT_X": True, "FLAT_Y": True, **dsa}, ("sxw", "syw")),
        (T._dsa_apply_backward_kernel,
         {"gy_ptr": f32, "x_ptr": f32, "m_ptr": "bf16", "gx_ptr": f32, "gm_ptr": "bf16"},
         {"FLAT_GY": True, "FLAT_X": False, "FLAT_GX": True, "WRITE_GX": True,
          "WRITE_GM": True, **dsa}, ("sgyw", "sxc", "sgxw")),
        (T._coord_pool_kernel,
         {"x_ptr": "bf16", "xh_ptr": "bf16", "xw_ptr": "bf16", "stat_h_ptr": f32,
          "stat_w_ptr": f32}, {"WITH_MAX": True, **coord}, ("sxc",)),
        (T._coord_pool_backward_kernel,
         {"gh_ptr": f32, "gw_ptr": f32, "x_ptr": f32, "stat_h_ptr": f32, "stat_w_ptr": f32,
          "gx_ptr": f32}, {"WITH_MAX": True, **coord, "FOLD": True}, ("sxw", "sgw")),
        (T._coord_scale_kernel,
         {"x_ptr": f32, "uh_ptr": "bf16", "uw_ptr": "bf16", "c_ptr": f32, "k_ptr": f32,
          "y_ptr": f32}, {"HAS_C": True, **coord}, ("sxc", "syc")),
        (T._coord_scale_backward_kernel,
         {"gy_ptr": f32, "x_ptr": f32, "uh_ptr": "bf16", "uw_ptr": "bf16", "c_ptr": f32,
          "k_ptr": f32, "gx_ptr": f32, "rows_gu_ptr": f32, "cols_gu_ptr": f32,
          "rows_g_ptr": f32},
         {"HAS_C": False, "WRITE_GX": True, "REDUCE": True, "REDUCE_G": False,
          **coord, "ACC": tl.float64}, ("sgyc", "sxc", "sgxc")),
    ]
    for fn, pointers, constexprs, unit_strides in jobs:
        kernel = compile_kernel(fn, pointers, constexprs, unit_strides)
        assert kernel.asm.get("cubin"), fn.__name__
        print(f"{fn.__name__}: sm_90 cubin, {len(kernel.asm['cubin'])} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
