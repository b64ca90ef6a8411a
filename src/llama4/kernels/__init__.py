"""CPU kernels in C, compiled for this machine on first use.

- `few_rows(x, weight, glu=False)`: the product of a few rows (decoding: one per sequence) with
  a float32 or bfloat16 weight, streamed from memory at close to the machine's bandwidth
  (kernels.c says how); with glu=True, x holds a SwiGLU's [gate | up] and the product takes
  silu(gate) * up. `llama4.model.layers.linear` and `glu_linear` run it for decode-sized
  inference products on CPU. Each product also names the weights that followed it last time
  (a decode step repeats its order), which a thread of idle priority reads into the cache while
  the caller is between products (`ReadAhead`).
- `rms_norm(x, eps, weight)`: RMS normalisation of a few float32 or bfloat16 rows in one call
  (`llama4.model.layers.rms_norm`).
- `decode_attention(q, k, v, mask, scale)`: one query per row against the KV cache
  (`llama4.model.attention.decode_attention`).
- `rope_(x, cos, sin, norm_eps)`: RoPE and the QK norm in place (`llama4.model.layers.rope_and_norm`).
- `llama4_decode_step`: a whole decode step (float32 or bfloat16 model) in one call, built from
  the above (`llama4.engine.step` lays out its plan).
Their slow, obvious twins are torch's F.linear, F.rms_norm, F.scaled_dot_product_attention and
`llama4.model.layers.apply_rope`; tests hold one against the other.

The source is compiled once per machine with the system C compiler (``$CC``, else cc/gcc/clang;
-O3 -march=native -pthread) into a cache directory (``$LLAMA4_KERNEL_CACHE``, else
``~/.cache/llama4/kernels``), keyed by the source, the compiler and the CPU's flags, and loaded
with ctypes (no torch headers: it builds in about a second). Products and attention split over
``torch.get_num_threads()`` threads of the library's own pool (kernels.c says why not OpenMP).

Where there is no compiler, or the build or its self-test fails, `available()` is False (a
warning says why, once) and torch's kernels run instead, ~1.3-1.5x slower at decoding. Set
``LLAMA4_KERNELS=0`` to turn the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("kernels.c")
MAX_ROWS = 16  # few_rows: up to this many rows of x; beyond, torch's GEMM is the right tool
NORM_MAX_NUMEL = 1 << 16  # rms_norm, rope_: inputs up to this size (one thread; larger ones take torch's)
# Idle pool workers spin this long for the next product before they sleep ($LLAMA4_SPIN_US).
# Spinning saves the wake-up but takes a core a busy machine's other processes want. Measured on
# 2 cores, batch-1 decoding, ms a step for 0 / 20 / 50 / 200 us: idle 31.4 / 32.6 / 30.7 / 30.9,
# beside one busy process 40.0 / 40.0 / 44.0 / 45.2 (1 ms: 35.3 idle, 68.0 busy, in another run).
SPIN_US = 0
# Bytes read ahead between products ($LLAMA4_READ_AHEAD; 0: off). ms a batch-1 decode step on the
# 2-core machine, A/B in one process, two arms each: off 26.1 / 27.4, 16 MiB 25.6 / 25.9 (batch
# 8: 82.6 / 82.6 against 81.8 / 78.1); beside a busy process off 32.1 / 34.4, on 33.3 / 32.6 (the
# idle-priority reader then reads almost nothing). 8 / 16 / 32 MiB: 24.4 / 24.0 / 23.9, off 25.4
# (measured with the first design, which read ahead on pool worker 1).
READ_AHEAD = 16 << 20
AHEAD_MAX = 4  # regions per product (kernels.c AHEAD_MAX)


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_flags() -> str:
    """What the CPU can do (part of the cache key: -march=native code must not move to an older
    CPU through a shared home directory)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def cache_dir() -> Path:
    env = os.environ.get("LLAMA4_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama4" / "kernels"


def _compile(cc: str, out: Path) -> None:
    """Build the shared library at `out` (atomically: concurrent builds never see a partial file)."""
    base = ["-O3", "-shared", "-fPIC", "-std=gnu11", "-pthread"]
    # -march=native where the compiler knows it (x86, recent Arm GCC), else -mcpu=native (Arm clang).
    attempts = [base + arch for arch in (["-march=native"], ["-mcpu=native"])]
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in attempts:
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.partial")
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        except OSError:
            os.unlink(tmp)
            raise
        if proc.returncode == 0:
            os.replace(tmp, out)
            return
        os.unlink(tmp)
        errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-300:]}")
    raise RuntimeError("\n".join(errors))


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LLAMA4_KERNELS", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        return _unavailable("no C compiler found (set CC, or install gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
        parts = (
            SOURCE.read_text(),
            Path(__file__).read_text(),
            cc,
            version,
            _cpu_flags(),
        )  # this file: the flags
        key = hashlib.sha256(b"\0".join(s.encode() for s in parts))
        path = cache_dir() / f"llama4-kernels-{key.hexdigest()[:16]}.so"
        if not path.is_file():
            _compile(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        return _unavailable(f"building {SOURCE.name} with {cc} failed: {e}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    _declare(lib.llama4_few_rows, ctypes.c_int64, [
        ptr, i64, ctypes.c_int,  # x, its row stride, whether x holds [gate | up] (glu)
        ptr, i64, ctypes.c_int,  # W, its row stride, whether bfloat16
        ptr, i64, i64, i64,  # y, M, N, K
        ctypes.c_int,  # threads
        ptr, ptr, ctypes.c_int, i64,  # regions to read ahead: addresses, bytes, how many, epoch
    ])  # fmt: skip
    _declare(lib.llama4_forget_ahead, None, [i64])
    _declare(lib.llama4_ahead_reading, ctypes.c_int64, [])
    _declare(lib.llama4_ahead_total, ctypes.c_int64, [])
    _declare(lib.llama4_rms_norm, None, [
        ptr, i64, ptr, ptr, ctypes.c_int,  # x, its row stride, w, y, whether bfloat16
        i64, i64, ctypes.c_float,  # rows, dim, eps
    ])  # fmt: skip
    _declare(lib.llama4_decode_attention, ctypes.c_int, [
        ptr, i64, i64,  # q and its strides (row, head)
        ptr, i64, i64, i64,  # k and its strides (row, head, position)
        ptr, i64, i64, i64,  # v and its strides
        ptr, i64,  # mask and its row stride
        ptr, ctypes.c_int,  # out, whether q, k, v and out are bfloat16
        i64, i64, i64, i64, i64,  # B, H, K, S, Dh
        ctypes.c_float, ctypes.c_int,  # scale, threads
    ])  # fmt: skip
    _declare(lib.llama4_rope, None, [
        ptr, ctypes.c_int,  # x, whether bfloat16
        i64, i64, i64, i64, i64,  # rows, row stride, heads, head stride, Dh
        ptr, ptr, ctypes.c_float,  # cos, sin, norm eps (< 0: no norm)
    ])  # fmt: skip
    _declare(lib.llama4_decode_step, ctypes.c_int64, [
        ptr, ptr, ptr, ptr, i64,  # the plan (llama4.engine.step), tokens, slots, positions, B
        ptr, ptr, ptr, ptr,  # logits, router logits, experts, gates
        ctypes.c_int,  # threads
    ])  # fmt: skip
    _declare(lib.llama4_set_spin, None, [i64])
    lib.llama4_set_spin(int(float(os.environ.get("LLAMA4_SPIN_US", SPIN_US)) * 1000))
    if not _self_test(lib):
        return _unavailable(f"{path} gives wrong products (compiler {cc}); using torch's kernels")
    return lib


def _declare(fn, restype, argtypes) -> None:
    fn.restype, fn.argtypes = restype, argtypes


def _unavailable(why: str) -> None:
    warnings.warn(f"llama4 CPU kernels unavailable, decoding uses torch's (slower): {why}", stacklevel=3)
    return None


def _self_test(lib: ctypes.CDLL) -> bool:
    """The fresh library against its torch twins on awkward sizes (a wrong compiler flag shows
    here): F.rms_norm, F.linear (float32 and bfloat16 weights, one and two threads, with and
    without the SwiGLU input), attention and RoPE."""
    g = torch.Generator().manual_seed(0)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # noqa: E731
    x, w = torch.randn(3, 77, generator=g), torch.randn(77, generator=g)
    if not close(_rms_norm(lib, x, 1e-5, w), F.rms_norm(x, (77,), w, 1e-5)):
        return False
    for dtype in (torch.float32, torch.bfloat16):
        for m, n, k, threads in ((1, 67, 133, 1), (5, 64, 256, 1), (11, 9, 40, 1), (3, 301, 257, 2)):
            x = torch.randn(m, 2 * k, generator=g)
            w = torch.randn(n, k, generator=g).to(dtype)
            if not close(_few_rows(lib, x[:, :k], w, False, threads)[0], F.linear(x[:, :k], w.float())):
                return False
            act = F.silu(x[:, :k]) * x[:, k:]
            if not close(_few_rows(lib, x, w, True, threads)[0], F.linear(act, w.float())):
                return False
    q, kv = torch.randn(2, 4, 1, 20, generator=g), torch.randn(2, 2, 2, 9, 20, generator=g)
    mask = torch.rand(2, 1, 1, 9, generator=g) < 0.7
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, enable_gqa=True)
    if not close(_decode_attention(lib, q, kv[0], kv[1], mask, 20**-0.5, 2), ref):
        return False
    q16, kv16 = q.bfloat16(), kv.bfloat16()
    ref = F.scaled_dot_product_attention(
        q16.float(), kv16[0].float(), kv16[1].float(), attn_mask=mask, enable_gqa=True
    )
    out16 = _decode_attention(lib, q16, kv16[0], kv16[1], mask, 20**-0.5, 2)
    if out16.dtype != torch.bfloat16 or not torch.allclose(out16.float(), ref, rtol=1e-2, atol=1e-2):
        return False
    x16, w16 = torch.randn(3, 77, generator=g).bfloat16(), torch.randn(77, generator=g).bfloat16()
    ref = (F.rms_norm(x16.float(), (77,), None, 1e-5).bfloat16() * w16).float()
    if not torch.allclose(_rms_norm(lib, x16, 1e-5, w16).float(), ref, rtol=1e-2, atol=1e-2):
        return False
    x, angles = torch.randn(3, 1, 5, 8, generator=g), torch.randn(3, 1, 1, 4, generator=g)
    pairs = x.unflatten(-1, (4, 2))
    c, s = angles.cos(), angles.sin()
    ref = torch.stack((pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c), -1)
    y = x.clone()
    _rope(lib, y, c, s, 1e-5)
    if not close(y, F.rms_norm(ref.flatten(-2), (8,), None, 1e-5)):
        return False
    y16 = x.bfloat16()
    _rope(lib, y16, c, s, -1.0)
    pairs = x.bfloat16().float().unflatten(-1, (4, 2))
    ref = torch.stack((pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c), -1)
    return torch.allclose(y16.float(), ref.flatten(-2), rtol=1e-2, atol=1e-2)


_enabled = True


def available() -> bool:
    """Whether the compiled kernels are in use (built on this machine and not `disabled()`)."""
    return _enabled and _library() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run torch's kernels instead inside this block (benchmarks and tests compare the two).
    A process-wide switch: other threads see it too."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `few_rows(x, weight)` applies: CPU, at most MAX_ROWS rows, weight (N, K) float32 or
    bfloat16 with contiguous rows, x of the same dtype."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.stride(1) == 1
        and (weight.dtype == torch.float32 or weight.dtype == torch.bfloat16)
        and x.dtype == weight.dtype  # as F.linear requires
        and 0 < x.shape[-1]
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and available()
    )


def few_rows(x: torch.Tensor, weight: torch.Tensor, glu: bool = False) -> torch.Tensor:
    """F.linear(x, weight) (no bias) for x (..., K) with few rows; the result has x's dtype.

    glu=True: x (..., 2K) holds [gate | up] and the product takes silu(gate) * up (a SwiGLU's
    down projection, without the three ops that form its input). The products accumulate in
    float32 (bfloat16 inputs are widened exactly), as torch's kernels do; sums run in a
    different order, so values differ from F.linear by rounding.
    """
    lib = _library()
    k = weight.shape[-1] if weight.dim() == 2 else -1
    if lib is None or not supports(x[..., :k] if glu else x, weight):
        raise ValueError(
            f"few_rows: unsupported x {tuple(x.shape)} {x.dtype} / weight {tuple(weight.shape)} "
            f"{weight.dtype} (or kernels unavailable); check supports() first"
        )
    if x.shape[-1] != (2 * k if glu else k):
        raise ValueError(
            f"few_rows: x has {x.shape[-1]} features, weight {tuple(weight.shape)} expects "
            f"{'2 x ' if glu else ''}{k}"
        )
    rows = x.reshape(-1, x.shape[-1])
    if rows.dtype != torch.float32:
        rows = rows.float()
    y = _read_ahead.product(lib, rows, weight, glu, torch.get_num_threads())
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _few_rows(
    lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, glu: bool, threads: int, ahead=(None, None, 0, 0)
) -> tuple[torch.Tensor, bool]:
    """The kernel call: x (M, K or 2K) float32, w (N, K) with contiguous rows -> (M, N), and
    whether `ahead` (regions to read ahead: addresses, bytes, count, epoch; epoch 0: leave the
    last ones) replaced the last ones."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, (n, k) = x.shape[0], w.shape
    y = torch.empty(m, n, dtype=torch.float32)
    bf16 = int(w.dtype == torch.bfloat16)
    status = lib.llama4_few_rows(
        x.data_ptr(),
        x.stride(0),
        int(glu),
        w.data_ptr(),
        w.stride(0),
        bf16,
        y.data_ptr(),
        m,
        n,
        k,
        threads,
        *ahead,
    )
    if status < 0:
        raise MemoryError(f"few_rows: no memory for the SwiGLU input of {tuple(x.shape)}")
    return y, status == 1


def _span(w: torch.Tensor) -> int:
    """Bytes from w's first element to its last: what a product with w (N, K) reads."""
    return ((w.shape[0] - 1) * w.stride(0) + w.shape[1]) * w.element_size()


class ReadAhead:
    """Names, for each product, the weights to read into the cache after it (kernels.c,
    "Reading ahead"): those that followed it the last time, up to `limit` bytes in all. A decode
    step multiplies the same weights in the same order every step, but for the routed experts
    (a guess wrong there costs only the idle time it used).

    The regions named to the library are weights the caller may drop at any time: their storages
    are held here, from before the call that names them (an exception such as Ctrl-C may come at
    any point of it) until the library can no longer read them: a later product replaced them and
    the reader is not inside them (it is never waited for, but by `forget()`, briefly).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # weight address -> (the next product's weight address, bytes, weak ref to its storage)
        self.after: dict[int, tuple[int, int, weakref.ref]] = {}
        self.last = 0
        self.held: dict[int, list[torch.UntypedStorage]] = {}  # epoch -> storages of its regions
        self.lock = threading.Lock()

    def product(
        self, lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, glu: bool, threads: int
    ) -> torch.Tensor:
        if self.limit <= 0 or threads < 2:
            return _few_rows(lib, x, w, glu, threads)[0]
        with self.lock:
            addr = w.data_ptr()
            if self.last:
                known = self.after.get(self.last)
                storage = w.untyped_storage()
                # Learn what followed `last`: a new weight, or a new storage at the same address.
                if known is None or known[0] != addr or known[2]() is not storage:
                    if len(self.after) >= 4096:  # addresses of weights long gone
                        self.after.clear()
                    self.after[self.last] = (addr, _span(w), weakref.ref(storage))
            self.last = addr
            ptrs, sizes, keep = [], [], []
            at, left = addr, self.limit
            while len(ptrs) < AHEAD_MAX and left > 0 and at in self.after:
                at, n, ref = self.after[at]
                storage = ref()
                if storage is None or at == addr:
                    break
                ptrs.append(at)
                sizes.append(min(n, left))
                keep.append(storage)
                left -= sizes[-1]
            epoch = next(_epochs)
            self.held[epoch] = keep  # before the library can see them
            ahead = (
                (ctypes.c_void_p * AHEAD_MAX)(*ptrs),
                (ctypes.c_int64 * AHEAD_MAX)(*sizes),
                len(ptrs),
                epoch,
            )
            y, replaced = _few_rows(lib, x, w, glu, threads, ahead)
            if replaced:
                self._release(lib, epoch)
            else:
                del self.held[epoch]
            return y

    def _release(self, lib: ctypes.CDLL, epoch: int) -> None:
        """The library reads epoch `epoch`'s regions now: let go of older ones it is not inside."""
        reading = lib.llama4_ahead_reading()  # after the epoch began (see kernels.c)
        self.held = {e: h for e, h in self.held.items() if e == epoch or e == reading}

    def forget(self) -> None:
        """Let go of the regions, after waiting up to 20 ms for the reader to leave them (else those
        it is inside go with the next product or forget)."""
        if not self.held:  # the library names nothing of ours (or was never loaded)
            return
        lib = _library()
        with self.lock:
            self.last = 0
            if lib is None:
                return
            epoch = next(_epochs)
            self.held[epoch] = []
            lib.llama4_forget_ahead(epoch)
            for _ in range(40):
                if lib.llama4_ahead_reading() in (0, epoch):
                    break
                time.sleep(0.0005)
            self._release(lib, epoch)

    def _after_fork(self) -> None:
        """A forked child: the lock may have been held by a thread the child does not have."""
        self.lock = threading.Lock()


_epochs = itertools.count(1)  # of the regions named to the library (all ReadAheads share one)
_read_ahead = ReadAhead(int(float(os.environ.get("LLAMA4_READ_AHEAD", READ_AHEAD))))
os.register_at_fork(after_in_child=_read_ahead._after_fork)


def forget_read_ahead() -> None:
    """Let go of the weights the last product named to read ahead (the engine calls this when a
    generation ends, so a model dropped afterwards is freed at once)."""
    _read_ahead.forget()


def read_ahead_total() -> int:
    """Bytes read ahead so far in this process (0 without the compiled kernels)."""
    lib = _library()
    return 0 if lib is None else lib.llama4_ahead_total()


_DTYPES = (torch.float32, torch.bfloat16)


def rms_norm_supports(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether `rms_norm(x, eps, weight)` applies: float32 or bfloat16 on CPU, at most
    NORM_MAX_NUMEL elements, weight None or a vector of x's dtype."""
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPES
        and 0 < x.numel() <= NORM_MAX_NUMEL
        and (
            weight is None
            or (
                weight.device.type == "cpu"
                and weight.dtype == x.dtype
                and weight.dim() == 1
                and weight.is_contiguous()
            )
        )
        and available()
    )


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """`llama4.model.layers.rms_norm(x, eps, weight)` for small inputs, in one call: F.rms_norm
    for float32; for bfloat16, normalised in float32, rounded, then scaled (as the reference)."""
    lib = _library()
    if lib is None or not rms_norm_supports(x, weight):
        raise ValueError(
            f"rms_norm: unsupported x {tuple(x.shape)} {x.dtype} (or kernels unavailable); "
            "check rms_norm_supports() first"
        )
    if weight is not None and weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight has {weight.shape[0]} elements, x has {x.shape[-1]} features")
    return _rms_norm(lib, x, eps, weight)


def _rms_norm(lib: ctypes.CDLL, x: torch.Tensor, eps: float, weight: torch.Tensor | None) -> torch.Tensor:
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype)
    lib.llama4_rms_norm(
        rows.data_ptr(), rows.stride(0), None if weight is None else weight.data_ptr(), y.data_ptr(),
        int(x.dtype == torch.bfloat16), rows.shape[0], dim, eps,
    )  # fmt: skip
    return y


def decode_attention_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> bool:
    """Whether `decode_attention` applies: float32 or bfloat16 (all three alike) on CPU, one query
    per row, head dims contiguous, and a mask (if any) that is one boolean per (row, key)."""
    return (
        q.device.type == k.device.type == v.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype
        and q.dtype in _DTYPES
        and q.dim() == k.dim() == v.dim() == 4
        and q.shape[2] == 1
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and k.shape == v.shape
        and q.shape[0] == k.shape[0]
        and q.shape[-1] == k.shape[-1]
        and k.shape[1] > 0
        and k.shape[2] > 0
        and q.shape[1] % k.shape[1] == 0
        and (
            mask is None
            or (
                mask.dtype == torch.bool
                and mask.dim() == 4
                and mask.shape[1] == mask.shape[2] == 1
                and mask.shape[0] in (1, q.shape[0])
                and mask.shape[3] == k.shape[2]
                and mask.stride(3) == 1
            )
        )
        and available()
    )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA of one query per row: q (B, H, 1, Dh), k and v (B, K, S, Dh) (query head h reads
    key/value head h // (H // K)), mask (B or 1, 1, 1, S) (True = attend) or None -> (B, H, 1, Dh),
    in q's dtype (bfloat16 inputs are computed in float32 and rounded once; SDPA's bfloat16 CPU
    kernel also rounds some intermediates). One call
    for what torch does in ~10 ops; threads split the (row, key/value head) pairs."""
    lib = _library()
    if lib is None or not decode_attention_supports(q, k, v, mask):
        raise ValueError(
            f"decode_attention: unsupported q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
            f"mask {None if mask is None else tuple(mask.shape)}; check decode_attention_supports() first"
        )
    return _decode_attention(lib, q, k, v, mask, scale, torch.get_num_threads())


def _decode_attention(lib, q, k, v, mask, scale, threads) -> torch.Tensor:
    B, H, _, Dh = q.shape
    K, S = k.shape[1], k.shape[2]
    out = torch.empty(B, H, 1, Dh, dtype=q.dtype)
    m = None if mask is None else mask.view(torch.uint8)
    status = lib.llama4_decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1),
        k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
        None if m is None else m.data_ptr(), 0 if m is None or m.shape[0] == 1 else m.stride(0),
        out.data_ptr(), int(q.dtype == torch.bfloat16), B, H, K, S, Dh, scale, threads,
    )  # fmt: skip
    if status:
        raise MemoryError(f"decode_attention: no memory for {B * K * S} scores")
    return out


def rope_supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope_(x, cos, sin)` applies: x (B, T, heads, Dh) float32 or bfloat16 on CPU, heads'
    dims contiguous, at most NORM_MAX_NUMEL elements; cos and sin (B, T, 1, Dh / 2) float32
    contiguous."""
    return (
        x.device.type == cos.device.type == sin.device.type == "cpu"
        and x.dtype in _DTYPES
        and cos.dtype == sin.dtype == torch.float32
        and x.dim() == 4
        and x.stride(-1) == 1
        and x.shape[-1] % 2 == 0
        and (x.shape[0] == 1 or x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1))  # rows
        and 0 < x.numel() <= NORM_MAX_NUMEL
        and cos.shape == sin.shape == (*x.shape[:2], 1, x.shape[-1] // 2)
        and cos.is_contiguous()
        and sin.is_contiguous()
        and available()
    )


def rope_(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm_eps: float | None = None
) -> torch.Tensor:
    """In place: `llama4.model.layers.apply_rope(x, cos, sin)`, then, if norm_eps is given,
    `rms_norm(x, norm_eps)` over each head (no weight). Returns x."""
    lib = _library()
    if lib is None or not rope_supports(x, cos, sin):
        raise ValueError(
            f"rope_: unsupported x {tuple(x.shape)} {x.dtype} / cos {tuple(cos.shape)}; check rope_supports() first"
        )
    _rope(lib, x, cos, sin, -1.0 if norm_eps is None else norm_eps)
    return x


def _rope(lib, x, cos, sin, norm_eps) -> None:
    B, T, heads, Dh = x.shape
    row_stride = x.stride(1) if T > 1 else x.stride(0)  # (B, T) as B * T rows
    lib.llama4_rope(
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        B * T,
        row_stride,
        heads,
        x.stride(2),
        Dh,
        cos.data_ptr(),
        sin.data_ptr(),
        norm_eps,
    )
