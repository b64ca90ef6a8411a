"""CPU kernels in C, compiled for this machine on first use.

- `few_rows(x, weight)`: the product of a few rows (decoding: one per sequence) with a float32
  or bfloat16 weight, streamed from memory at close to the machine's bandwidth (kernels.c says
  how). `llama4.model.layers.linear` runs it for decode-sized inference products on CPU.
- `rms_norm(x, eps, weight)`: RMS normalisation of a few float32 rows in one call
  (`llama4.model.layers.rms_norm` runs it for decode-sized inference inputs on CPU).
Their slow, obvious twins are torch's F.linear and F.rms_norm; tests hold one against the other.

The source is compiled once per machine with the system C compiler (``$CC``, else cc/gcc/clang;
-O3 -march=native -fopenmp) into a cache directory (``$LLAMA4_KERNEL_CACHE``, else
``~/.cache/llama4/kernels``), keyed by the source, the compiler and the CPU's flags, and loaded
with ctypes (no torch headers: it builds in about a second). Each call uses
``torch.get_num_threads()`` OpenMP threads (with torch's Linux wheels the library links the
libgomp torch already loaded: one thread pool).

Where there is no compiler, or the build or its self-test fails, `available()` is False (a
warning says why, once) and torch's kernels run instead, ~20-30% slower at decoding. Set
``LLAMA4_KERNELS=0`` to turn the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("kernels.c")
MAX_ROWS = 16  # few_rows: up to this many rows of x; beyond, torch's GEMM is the right tool
NORM_MAX_NUMEL = 1 << 16  # rms_norm: inputs up to this size (one thread; larger ones take torch's)


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
    base = ["-O3", "-shared", "-fPIC", "-std=gnu11"]
    # -march=native where the compiler knows it (x86, recent Arm GCC), else -mcpu=native (Arm clang);
    # -fopenmp where available (Apple clang lacks it: one thread then).
    attempts = [
        base + arch + omp for arch in (["-march=native"], ["-mcpu=native"]) for omp in (["-fopenmp"], [])
    ]
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
            if "-fopenmp" not in flags:
                warnings.warn(
                    f"{cc} cannot build with OpenMP: llama4's CPU kernels run on one thread", stacklevel=4
                )
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
    fn = lib.llama4_few_rows
    fn.restype = None
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_int64,  # x, its row stride
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,  # W, its row stride, whether bfloat16
        ctypes.c_void_p,  # y
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # M, N, K
        ctypes.c_int,  # threads
    ]  # fmt: skip
    norm = lib.llama4_rms_norm
    norm.restype = None
    norm.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,  # x, its row stride, w, y
        ctypes.c_int64, ctypes.c_int64, ctypes.c_float,  # rows, dim, eps
    ]  # fmt: skip
    if not _self_test(lib):
        return _unavailable(f"{path} gives wrong products (compiler {cc}); using torch's kernels")
    return lib


def _unavailable(why: str) -> None:
    warnings.warn(f"llama4 CPU kernels unavailable, decoding uses torch's (slower): {why}", stacklevel=3)
    return None


def _self_test(lib: ctypes.CDLL) -> bool:
    """The fresh library against F.linear and F.rms_norm on awkward sizes (a wrong compiler flag
    shows here)."""
    g = torch.Generator().manual_seed(0)
    x, w, y = torch.randn(3, 77, generator=g), torch.randn(77, generator=g), torch.empty(3, 77)
    lib.llama4_rms_norm(x.data_ptr(), 77, w.data_ptr(), y.data_ptr(), 3, 77, 1e-5)
    if not torch.allclose(y, F.rms_norm(x, (77,), w, 1e-5), rtol=1e-5, atol=1e-6):
        return False
    for dtype in (torch.float32, torch.bfloat16):
        for m, n, k, threads in ((1, 67, 133, 1), (5, 64, 256, 1), (11, 9, 40, 1), (3, 301, 257, 2)):
            x = torch.randn(m, k, generator=g)
            w = torch.randn(n, k, generator=g).to(dtype)
            y = torch.empty(m, n)
            bf16 = int(dtype == torch.bfloat16)
            lib.llama4_few_rows(x.data_ptr(), k, w.data_ptr(), k, bf16, y.data_ptr(), m, n, k, threads)
            if not torch.allclose(y, F.linear(x, w.float()), rtol=1e-4, atol=1e-4):
                return False
    return True


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


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) for x (..., K) with few rows; the result has x's dtype.

    The products accumulate in float32 (bfloat16 inputs are widened exactly), as torch's
    kernels do; sums run in a different order, so values differ from F.linear by rounding.
    """
    lib = _library()
    if lib is None or not supports(x, weight):
        raise ValueError(
            f"few_rows: unsupported x {tuple(x.shape)} {x.dtype} / weight {tuple(weight.shape)} "
            f"{weight.dtype} (or kernels unavailable); check supports() first"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"few_rows: x has {x.shape[-1]} features, weight {tuple(weight.shape)} expects {weight.shape[1]}"
        )
    rows = x.reshape(-1, x.shape[-1])
    if rows.dtype != torch.float32:
        rows = rows.float()
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, n, k = rows.shape[0], weight.shape[0], weight.shape[1]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.llama4_few_rows(
        rows.data_ptr(), rows.stride(0), weight.data_ptr(), weight.stride(0),
        int(weight.dtype == torch.bfloat16), y.data_ptr(), m, n, k, torch.get_num_threads(),
    )  # fmt: skip
    y = y.view(*x.shape[:-1], n)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def rms_norm_supports(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether `rms_norm(x, eps, weight)` applies: float32 on CPU, at most NORM_MAX_NUMEL
    elements, weight None or a float32 vector."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and 0 < x.numel() <= NORM_MAX_NUMEL
        and (
            weight is None
            or (
                weight.device.type == "cpu"
                and weight.dtype == torch.float32
                and weight.dim() == 1
                and weight.is_contiguous()
            )
        )
        and available()
    )


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """F.rms_norm(x, (x.shape[-1],), weight, eps) for small float32 inputs, in one call."""
    lib = _library()
    if lib is None or not rms_norm_supports(x, weight):
        raise ValueError(
            f"rms_norm: unsupported x {tuple(x.shape)} {x.dtype} (or kernels unavailable); "
            "check rms_norm_supports() first"
        )
    dim = x.shape[-1]
    if weight is not None and weight.shape[0] != dim:
        raise ValueError(f"rms_norm: weight has {weight.shape[0]} elements, x has {dim} features")
    rows = x.reshape(-1, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32)
    lib.llama4_rms_norm(
        rows.data_ptr(), rows.stride(0), None if weight is None else weight.data_ptr(), y.data_ptr(),
        rows.shape[0], dim, eps,
    )  # fmt: skip
    return y
