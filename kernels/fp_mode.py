"""Denormal floats flushed to zero inside every compiled kernel, and the caller's floating-point mode restored.

A decaying recurrence fed silence (or random frames, for long enough) drifts into denormal floats, which x86 and
many ARM cores compute at a fraction of normal speed: LMUFormer-SCv2's chunk-16 step went from 66 to 304 us per
frame on a realistic stream. Each kernel therefore saves the floating-point control register, sets
flush-to-zero and denormals-are-zero (x86 MXCSR |= 0x8040; AArch64 FPCR.FZ, bit 24), runs, and restores what it
saved: every way of running the library gets the fast mode, and the caller's thread is left as it was. TVM's pool
threads (parallel loops with more than one thread) get it, for good, from `POOL_FUNCTION`, which loading a
bundle calls once: those threads are TVM's own, never the caller's.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

X86_FTZ_DAZ = 0x8040
AARCH64_FZ = 1 << 24
POOL_FUNCTION = "edgekit_flush_denormals_on_pool_threads"
POOL_TASKS = 1024  # iterations of the parallel loop: TVM gives every pool thread a share of them


@I.ir_module
class X86Pool:
    @T.prim_func(private=True)
    def edgekit_pool_mxcsr(done: T.Buffer((1,), "int32")):
        for i in T.parallel(POOL_TASKS):
            csr = T.alloc_buffer((1,), "int32", scope="local")
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.stmxcsr", T.address_of(csr[0])))
            csr[0] = T.bitwise_or(csr[0], X86_FTZ_DAZ)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.ldmxcsr", T.address_of(csr[0])))
            done[0] = 1

    @R.function
    def edgekit_flush_denormals_on_pool_threads() -> R.Tensor((1,), "int32"):
        cls = X86Pool
        return R.call_tir(cls.edgekit_pool_mxcsr, (), out_ty=R.Tensor((1,), "int32"))


@I.ir_module
class AArch64Pool:
    @T.prim_func(private=True)
    def edgekit_pool_fpcr(done: T.Buffer((1,), "int32")):
        for i in T.parallel(POOL_TASKS):
            T.evaluate(T.call_llvm_intrin("void", "llvm.aarch64.set.fpcr", T.bitwise_or(
                T.call_llvm_intrin("int64", "llvm.aarch64.get.fpcr"), T.int64(AARCH64_FZ))))
            done[0] = 1

    @R.function
    def edgekit_flush_denormals_on_pool_threads() -> R.Tensor((1,), "int32"):
        cls = AArch64Pool
        return R.call_tir(cls.edgekit_pool_fpcr, (), out_ty=R.Tensor((1,), "int32"))


POOLS = {"x86_64": X86Pool, "aarch64": AArch64Pool}


def _arch(target: tvm.target.Target) -> str | None:
    triple = str(target.attrs.get("mtriple", ""))
    return "x86_64" if triple.startswith("x86_64") else "aarch64" if triple.startswith("aarch64") else None


def _x86_guard(body: tirx.Stmt) -> tuple[list, tirx.Stmt]:
    """(buffers to allocate, body between save+set and restore of MXCSR)."""
    saved = tirx.decl_buffer((1,), "int32", name="mxcsr_saved", scope="local")
    fast = tirx.decl_buffer((1,), "int32", name="mxcsr_fast", scope="local")
    addr = lambda b: tirx.address_of(tirx.BufferLoad(b, [0]))  # noqa: E731
    csr = lambda op, b: tirx.Evaluate(tirx.call_llvm_intrin("void", f"llvm.x86.sse.{op}", addr(b)))  # noqa: E731
    return [saved, fast], tirx.SeqStmt([
        csr("stmxcsr", saved),
        tirx.BufferStore(fast, tirx.BufferLoad(saved, [0]) | X86_FTZ_DAZ, [0]),
        csr("ldmxcsr", fast),
        body,
        csr("ldmxcsr", saved),
    ])


def _aarch64_guard(body: tirx.Stmt) -> tuple[list, tirx.Stmt]:
    saved = tirx.decl_buffer((1,), "int64", name="fpcr_saved", scope="local")
    get = tirx.call_llvm_intrin("int64", "llvm.aarch64.get.fpcr")
    put = lambda v: tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.aarch64.set.fpcr", v))  # noqa: E731
    return [saved], tirx.SeqStmt([
        tirx.BufferStore(saved, get, [0]),
        put(tirx.BufferLoad(saved, [0]) | tirx.const(AARCH64_FZ, "int64")),
        body,
        put(tirx.BufferLoad(saved, [0])),
    ])


def _guarded(func: tirx.PrimFunc, guard) -> tirx.PrimFunc:
    body = func.body
    if isinstance(body, s_tir.SBlockRealize):  # scheduled TIR: the buffers belong to the root block
        root = body.block
        buffers, inner = guard(root.body)
        block = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, inner, root.init,
                             [*root.alloc_buffers, *buffers], root.match_buffers, root.annotations)
        return func.with_body(s_tir.SBlockRealize(body.iter_values, body.predicate, block))
    buffers, inner = guard(body)
    return func.with_body(tirx.SeqStmt([*[tirx.AllocBuffer(b) for b in buffers], inner]))


def flushes_denormals(target: tvm.target.Target) -> bool:
    """Whether libraries built for `target` flush denormals (CPU targets of a known architecture)."""
    return target.kind.name == "llvm" and _arch(target) in POOLS


def add_pool_function(target: tvm.target.Target) -> tvm.transform.Pass:
    """The pass adding `POOL_FUNCTION` (a Relax function) to the module, for architectures that flush."""

    @tvm.transform.module_pass(opt_level=0, name="AddPoolFunction")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not flushes_denormals(target):
            return mod
        mod.update(POOLS[_arch(target)])
        return mod

    return run


def flush_denormals(target: tvm.target.Target) -> tvm.transform.Pass:
    """The pass: every PrimFunc of the module guarded for `target`'s architecture (others: unchanged)."""
    guard = {"x86_64": _x86_guard, "aarch64": _aarch64_guard}.get(_arch(target))

    @tvm.transform.module_pass(opt_level=0, name="FlushDenormals")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if guard is None:
            return mod
        updates = {gv: _guarded(f, guard) for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return run
