"""Unchecked loads and stores of 16/32/64-bit integers in uint8 arrays, for the PNIC kernels.

Numba reads `a[i]` one byte at a time with a negative-index test each; a flow entry's fields
and a header's words are read here in one (unaligned) machine load instead: little-endian for
the entry (ENTRY_DTYPE is little-endian), byte-swapped for network order. The arrays must be
one-dimensional and contiguous, and the callers keep every access inside them, as the parser
does with the captured length. Values come back as int64 (zero-extended; a 64-bit field as its
int64 bit pattern) and stores keep the low bits of an int64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from flowshift.tiers._pnic_cache import cache_dir

_I64 = ir.IntType(64)


def _address(context, builder, arr_type, arr, i, bits):
    a = context.make_array(arr_type)(context, builder, arr)
    return builder.bitcast(builder.gep(a.data, [i]), ir.IntType(bits).as_pointer())


def _bswap(builder, v, bits):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v.type, [v.type]),
                                        f"llvm.bswap.i{bits}")
    return builder.call(fn, [v])


def _loader(bits: int, network: bool):
    def load(typingctx, arr, i):
        def codegen(context, builder, signature, args):
            ptr = _address(context, builder, signature.args[0], args[0], args[1], bits)
            v = builder.load(ptr, align=1)
            if network:
                v = _bswap(builder, v, bits)
            return v if bits == 64 else builder.zext(v, _I64)

        return types.int64(arr, types.intp), codegen

    return intrinsic(load)


def _storer(bits: int, network: bool):
    def store(typingctx, arr, i, v):
        def codegen(context, builder, signature, args):
            ptr = _address(context, builder, signature.args[0], args[0], args[1], bits)
            w = args[2] if bits == 64 else builder.trunc(args[2], ir.IntType(bits))
            if network:
                w = _bswap(builder, w, bits)
            builder.store(w, ptr, align=1)

        return types.void(arr, types.intp, types.int64), codegen

    return intrinsic(store)


ld16 = _loader(16, False)
ld32 = _loader(32, False)
ld64 = _loader(64, False)
st16 = _storer(16, False)
st32 = _storer(32, False)
st64 = _storer(64, False)
be16 = _loader(16, True)
be32 = _loader(32, True)
be64 = _loader(64, True)
st_be16 = _storer(16, True)


@intrinsic
def prefetch(typingctx, arr, i):
    """Ask for the cache line of arr[i] ahead of use (a hint: never faults)."""
    def codegen(context, builder, signature, args):
        ptr = _address(context, builder, signature.args[0], args[0], args[1], 8)
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data

    return types.void(arr, types.intp), codegen


def cached(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """numba.njit(cache=True, **options), cached in _pnic_cache.cache_dir(): keyed by every
    source the kernels read, where numba alone keys a kernel by its own file. For every
    compiled function of flowshift, the trace I/O's too."""
    jit = numba.njit(cache=True, **options)

    def decorate(fn: Callable[..., Any]) -> Any:
        # numba picks a function's cache directory when it is decorated: point it at ours for
        # that moment only, so that other numba users in the process keep theirs.
        # numba.config sets CACHE_DIR at run time (from NUMBA_CACHE_DIR): its stubs lack it
        saved = numba.config.CACHE_DIR  # type: ignore[attr-defined]
        numba.config.CACHE_DIR = cache_dir()  # type: ignore[attr-defined]
        try:
            return jit(fn)
        finally:
            numba.config.CACHE_DIR = saved  # type: ignore[attr-defined]

    return decorate


def kernel(*, inline: bool = True, private: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """`cached` for the engine's kernels, without reference counting (numba's `_nrt` option).
    Every array argument of a compiled call otherwise costs two atomic reference-count
    updates, several dozen per packet, more than the packet's own work; the kernels allocate
    nothing, so they need none.

    `inline`: LLVM inlines the function into every kernel that calls it (numba's `forceinline`,
    LLVM's `alwaysinline`), so that `process_batch` compiles to one function without calls. A
    call between numba functions passes each array as seven words and goes through numba's
    calling convention (status, exception and result pointers): with a dozen such calls per
    packet, half of the engine's time. numba's own `inline="always"` inlines its IR instead and
    types the callee again at every call site: slower to compile, and no faster.
    `private`: called from other kernels only, never from Python: numba builds no CPython or C
    wrapper for it (a seventh of the compilation).
    The GIL is released while a kernel runs (`nogil`): a thread reading the trace ahead
    (packet/ahead.py) then finds it free."""
    # `_nrt` is a real (private) numba option
    return cached(_nrt=False, forceinline=inline, no_cpython_wrapper=private,
                  no_cfunc_wrapper=private, nogil=True)
