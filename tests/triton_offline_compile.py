"""Compile every Triton kernel launch of the fused ops for a GPU target on a machine without a GPU.

    TRITON_INTERPRET=1 python tests/triton_offline_compile.py record launches.json   # run the ops, record launches
    python tests/triton_offline_compile.py compile launches.json 90                  # compile them for sm_90

`record` runs the Triton backends under the interpreter on small inputs (bf16/fp16/fp32, NHWC/NCHW, 1×1 stride 2 and
3×3 stride 1, train and eval) and writes each distinct launch: kernel, argument types and constexpr values.
`compile` (a separate process, so the kernels import as real `triton.jit` functions) compiles each launch with
`triton.compile` for `GPUTarget("cuda", arch, 32)`, after replacing the interpreter-only choices of the conv launcher
with its GPU ones (`kernels.conv.dot_config` / `_block_m` for a CUDA device: bf16 tensor-core dots, tf32, larger
tiles). This catches what only the GPU compiler rejects (types, shapes of tl.dot, unsupported ops, shared memory at
these tile sizes); it runs nothing on a GPU.
"""
import importlib
import inspect
import json
import sys

import torch

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}
_TORCH = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp64": torch.float64}


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2 ** 31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def record(path: str) -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    launches = {}
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args), **{k: v for k, v in kwargs.items() if k in params})
        entry = {}
        for name, p in params.items():
            value = bound[name]
            if p.annotation is tl.constexpr or "constexpr" in str(p.annotation):
                entry[name] = ["constexpr", str(value) if isinstance(value, tl.dtype) else value]
            else:
                entry[name] = [_arg_type(value), None]
        launches[json.dumps([self.fn.__module__, self.fn.__name__, entry], sort_keys=True)] = 1
        return run(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    from fastresnet import reference
    from fastresnet.backends import get_backend_impl

    be = get_backend_impl("triton_conv")  # its primitives are tier A's kernels: both tiers are exercised
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for nhwc in (True, False):
            x = (torch.randn(2, 16, 6, 6) - 1).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last) if nhwc else x
            mean, var = be.batch_stats(x)
            rstd = torch.rsqrt(var + 1e-5)
            s, t = reference.scale_shift(mean, rstd, None, None)
            for k, stride in ((3, 1), (1, 2)):
                w = torch.randn(16, 16, k, k).to(dtype)
                y, _, _ = be.bn_relu_conv_stats(x, s, t, w, (stride, stride), (k // 2, k // 2),
                                                x if stride == 1 else None)
                be.bn_relu_conv_backward(y, x, s, t, mean, rstd, w, (stride, stride), (k // 2, k // 2), True)
            be.bn_relu_backward(x, x, s, t, mean, rstd, True, x)
            be.bn_relu_backward(x, x, s, t, mean, rstd, False)
            be.bn_relu(x, s, t, torch.bfloat16)
            be.add_stats(x, x.float())
    with open(path, "w") as f:
        json.dump([json.loads(k) for k in launches], f)
    print(f"recorded {len(launches)} distinct launches")


def compile_all(path: str, arch: int) -> int:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastresnet.kernels import conv

    cuda = torch.device("cuda")  # only consulted for the launcher's GPU choices; nothing runs on it
    dtypes = {str(d): d for d in (tl.float32, tl.float16, tl.bfloat16, tl.float64)}
    failures = 0
    for module, name, entry in json.load(open(path)):
        fn = getattr(importlib.import_module(module), name)
        signature = {k: v[0] for k, v in entry.items()}
        constexprs = {k: dtypes.get(v[1], v[1]) for k, v in entry.items() if v[0] == "constexpr"}
        if module == conv.__name__ and "DOT_DTYPE" in constexprs:
            compute = _TORCH[signature["w_ptr"] if "w_ptr" in signature else signature["x_ptr"]]
            constexprs["DOT_DTYPE"], constexprs["PRECISION"] = conv.dot_config(compute, cuda)
            constexprs["BLOCK_M"] = conv._block_m(cuda)
        try:
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                    target=GPUTarget("cuda", arch, 32))
            print(f"ok   {name} (shared memory {kernel.metadata.shared} B)")
        except Exception as e:  # report every failing launch, then fail
            failures += 1
            print(f"FAIL {name} {constexprs}: {type(e).__name__}: {e}")
    print(f"{failures} failures")
    return failures


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(sys.argv[2])
    else:
        sys.exit(1 if compile_all(sys.argv[2], int(sys.argv[3])) else 0)
