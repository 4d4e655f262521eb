"""Speed settings the scripts apply: the CPU allocator at start-up, and torch.compile.

glibc's malloc returns large activation buffers to the OS after every step and maps them again
on the next (hundreds of thousands of page faults per step on CPU). Serving large blocks from
the heap (no mmap) and not trimming it keeps them there. Only on Linux with glibc; a no-op
elsewhere (set CONVNEXT_NO_MALLOC_TUNING=1 to keep glibc's defaults).
"""
import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def tune_allocator(enabled=True):
    """Keep freed buffers in the heap (enabled) or restore glibc's defaults. Returns success."""
    if os.environ.get("CONVNEXT_NO_MALLOC_TUNING"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mmap_max, trim = (0, 1 << 30) if enabled else (65536, 128 * 1024)  # tuned | glibc defaults
    return bool(mallopt(M_MMAP_MAX, mmap_max)) and bool(mallopt(M_TRIM_THRESHOLD, trim))


def maybe_compile(model, enabled):
    """torch.compile when asked; where it cannot work, say so and train eagerly."""
    import torch
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as e:  # an environment without a working compiler: train eagerly
        print(f"warning: torch.compile is not available here ({type(e).__name__}: {e}); running eagerly")
        return model
