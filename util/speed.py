"""Speed settings the scripts apply: the CPU allocator at start-up, and torch.compile with an
eager fallback.

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
import sys

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


def maybe_compile(model, enabled):
    """torch.compile when asked; where compiling cannot work, say so in one line and run eagerly.

    torch.compile itself only wraps the model: the compiler (dynamo, inductor, a C++ compiler on
    CPU, triton on GPU) runs at the first call, and AOTAutograd compiles the backward lazily at
    the first backward. So the backward is compiled together with the forward here, and the
    forward of the returned module (still torch's OptimizedModule, so `no_sync`, `train()`,
    parameters and the EMA's state_dict order are unchanged) catches a compilation failure at
    any call, warns once and from then on calls `model` itself. The eager retry runs the same
    inputs, so an error of the model's own comes back from it with its real traceback.
    Checkpoints are saved from the unwrapped model (util/train_state.py), never with the
    `_orig_mod.` key prefix of the compiled wrapper.
    """
    import torch
    if not enabled:
        return model
    try:
        compiled = torch.compile(model)
    except Exception as e:  # e.g. a Python version torch.compile does not support
        _warn_eager(e)
        return model
    _compile_backward_with_forward()
    compiled_forward = compiled.forward
    failed = []

    def forward(*args, **kwargs):
        if not failed:
            try:
                return compiled_forward(*args, **kwargs)
            except _compile_errors() as e:
                failed.append(True)
                _warn_eager(e)
        # outside the except block: the failed call's frames and tensors are freed by now
        return model(*args, **kwargs)

    compiled.forward = forward  # an instance attribute, as OptimizedModule sets it itself
    return compiled


def _compile_backward_with_forward():
    """AOTAutograd compiles the backward graph at the first backward by default, outside any
    forward call; compiling it with the forward makes its failures ours to catch too."""
    try:
        import torch._functorch.config as functorch_config
        if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
            functorch_config.force_non_lazy_backward_lowering = True
    except ImportError:
        pass


def _compile_errors():
    """What a failed compilation raises: dynamo wraps backend failures (inductor's
    InvalidCxxCompiler, a missing triton) in BackendCompilerFailed, a TorchDynamoException;
    a broken toolchain may also surface as an OS, import or subprocess error."""
    import subprocess
    errors = [ImportError, OSError, subprocess.SubprocessError]
    try:
        from torch._dynamo.exc import TorchDynamoException
        errors.append(TorchDynamoException)
    except ImportError:
        pass
    return tuple(errors)


def _warn_eager(e):
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    # stderr: seen on every rank that falls back, and by the benchmark, which silences stdout
    sys.stderr.write(f"warning: --compile: torch.compile failed here ({type(e).__name__}: {first}); "
                     f"running eagerly, without compilation\n")
    sys.stderr.flush()
