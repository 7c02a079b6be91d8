"""How Triton's JIT specialises a launch's arguments, for ahead-of-time compiles without a GPU.

Shared by ``static_report.py`` and the tests' sm_90 compile checks (``tests/_aot.py``). Imports nothing at module
level and sets no environment, so a test process running the Triton interpreter can import it.
"""

from __future__ import annotations


def dtype_names():
    """torch dtype → Triton's pointer element name, for the dtypes the kernels take."""
    import torch

    return {
        torch.float16: "fp16",
        torch.bfloat16: "bf16",
        torch.float32: "fp32",
        torch.int32: "i32",
        torch.int64: "i64",
    }


def specialise(arg_names, values, constexpr_names):
    """``(signature, constexprs, attributes)`` of a launch as the JIT specialises it, for ``triton.compiler.ASTSource``:
    the named constexprs stay constants, tensors become pointers with 16-divisibility, floats fp32, bools i1, ints
    equal to 1 constants, other ints i32 / i64 with 16-divisibility when divisible by 16."""
    import torch

    ty = dtype_names()
    sig, consts, attrs = {}, {}, {}
    for i, n in enumerate(arg_names):
        v = values[n]
        if n in constexpr_names:
            sig[n], consts[n] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[n] = "*" + ty[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        elif isinstance(v, bool):
            sig[n] = "i1"
        elif v == 1:
            sig[n], consts[n] = "constexpr", 1
        else:
            sig[n] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs
