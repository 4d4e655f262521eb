"""The CPU allocator tuning the scripts apply at start-up.

glibc's malloc returns large activation buffers to the OS after every step and maps them again
on the next (hundreds of thousands of page faults per step on CPU). Serving large blocks from
the heap (no mmap) and not trimming it keeps them there. Only on Linux with glibc, and only
for runs on the CPU (`tune_allocator_for`): on a GPU the activations live in CUDA's own caching
allocator, and a heap that never shrinks would only hold host memory. A no-op elsewhere (set
CONVNEXT_NO_MALLOC_TUNING=1 to keep glibc's defaults).
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


def tune_allocator_for(device):
    """Tune glibc's allocator for a run on `device`: CPU runs only. Returns whether it did."""
    return device.type == "cpu" and tune_allocator()
