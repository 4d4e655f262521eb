"""Throughput of the suite's real engines against a plain timm training loop, in one process.

    python benchmarks/bench_train.py --model convnextv2_atto --input_size 224 --batch_size 32
    python benchmarks/bench_train.py ... --channels_last --json
    python benchmarks/bench_train.py --data_pipeline --workers 0 1 2     # JPEG decode + augment
    python benchmarks/bench_train.py --startup                           # README demo: first step
    python benchmarks/bench_train.py --grad_checkpointing --model convnextv2_tiny --batch_size 8
    python benchmarks/bench_train.py --linear_probe --model convnextv2_tiny --batch_size 8

Contenders are timed round-robin (machine stalls hit all of them), each a median over rounds.
Engines run through the real epoch loop (util/train_loop.train_one_epoch) with the tasks' own
losses (engine_finetune.classification_loss, engine_pretrain.masked_loss) and
engine_finetune.evaluate, fed from an in-memory loader. Each contender's very first
step is timed on its own (one-time costs: allocator, cuDNN autotuning, compilation), and its
peak memory is measured per contender (see PeakMemory). `forward_gmacs` is counted with
torch.utils.flop_counter on one forward at batch 1; `mfu` = 3 x 2 x MACs x img/s / the device's
dense bf16 peak (a table of known GPUs, or --peak_tflops). `finetune_gflops_per_img` and
`pretrain_gflops_per_img` count one training step's forward + backward per image (FCMAE at mask
ratio 0.6), so `pretrain_step_vs_finetune_step` (time) stands beside
`pretrain_flops_vs_finetune_flops` (operations).
"""
import argparse
import ctypes
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


class InMemoryLoader:
    """The same prepared batches every epoch (what the engines iterate over)."""

    def __init__(self, batches):
        self.batches, self.batch_size = batches, batches[0][0].shape[0]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _loop_args(a):
    """The settings train_one_epoch reads from a run's args: no accumulation, clipping or log lines."""
    return argparse.Namespace(update_freq=1, clip_grad=None, print_freq=10 ** 9, skip_nonfinite=0,
                              channels_last=a.channels_last, compile=a.compile)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use_fn():
    """glibc's bytes in use by malloc (heap chunks + mmapped blocks), or None off glibc >= 2.33."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def in_use():
        m = mallinfo2()
        return m.uordblks + m.hblkhd
    return in_use


class PeakMemory:
    """Memory allocated while one call runs: its peak, and the part above what was allocated
    when the call began (the step's own working memory: activations, gradients, temporaries;
    not the weights and optimizer state every contender keeps between calls).

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (exact, no cost: measured
    on every call). CPU: there is no allocator counter, and the resident set is no measure here
    (the tuned allocator never gives freed memory back, so RSS only grows); instead glibc's
    bytes in use by malloc (mallinfo2), sampled every millisecond by a thread, on the warm-up
    call only, so the sampling never touches a timed call. Peaks between samples can be missed.
    """

    def __init__(self, device):
        self.device = device
        self.heap = None if device.type == "cuda" else _heap_in_use_fn()

    def measure(self, fn):
        """Run fn(); return (peak bytes, bytes allocated at the start) or None."""
        if self.device.type == "cuda":
            _sync(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            _sync(self.device)
            return torch.cuda.max_memory_allocated(self.device), start
        if self.heap is None:
            fn()
            return None
        for _ in range(5):  # a call faster than the sampler (a tiny eval step) is measured again
            start = self.heap()
            peak, samples = self._sampled(fn)
            if samples:
                break
        return max(peak, self.heap()), start

    def _sampled(self, fn):
        """(the largest heap seen, how many samples landed) while fn() ran, sampled every ms."""
        peak = [self.heap(), 0]
        done = threading.Event()
        running = threading.Event()

        def sample():
            running.set()
            while not done.wait(0.001):
                peak[0], peak[1] = max(peak[0], self.heap()), peak[1] + 1
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        running.wait()
        try:
            fn()
        finally:
            done.set()
            t.join()
        return peak[0], peak[1]


class Contender:
    def __init__(self, name, fn, first_fn, images_per_call):
        self.name, self.fn, self.first_fn, self.images = name, fn, first_fn, images_per_call
        self.times, self.faults = [], []
        self.first_s = self.warm_s = None
        self.peak = self.step_mem = None   # bytes

    def record_memory(self, measured):
        if measured is not None:
            peak, start = measured
            self.peak = max(self.peak or 0, peak)
            self.step_mem = max(self.step_mem or 0, peak - start)

    def run_first(self, device):
        """The very first step of this contender, timed alone (one-time costs included)."""
        _sync(device)
        t0 = time.perf_counter()
        self.first_fn()
        _sync(device)
        self.first_s = time.perf_counter() - t0

    def warm_up(self, device, mem):
        """A whole call, untimed (memory is measured from here on: the first step's one-time
        buffers, e.g. cuDNN's autotuning workspace, are not the step's steady need)."""
        t0 = time.perf_counter()
        self.record_memory(mem.measure(self.fn))
        self.warm_s = time.perf_counter() - t0

    def run(self, device, mem):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        _sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":  # exact and free there; on CPU sampling would disturb the timing
            self.record_memory(mem.measure(self.fn))
        else:
            self.fn()
        _sync(device)
        self.times.append(time.perf_counter() - t0)
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

    def img_per_s(self):
        return self.images / statistics.median(self.times)


# dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match)
# (NVIDIA data sheets: half the "with sparsity" figure)
PEAK_BF16_TFLOPS = [
    ("H200 NVL", 835.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),  # SXM
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0),   # GeForce: fp16/bf16 with fp32 accumulation
]


def peak_tflops(a, device):
    """(TFLOP/s, where it came from) or (None, None) when unknown."""
    if a.peak_tflops:
        return a.peak_tflops, "--peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in PEAK_BF16_TFLOPS:
            if key in name:
                return tf, f"table: {name}"
    return None, None


def forward_macs(model, input_size, device, channels_last):
    """Multiply-accumulates of one forward at batch 1 (torch's FLOP counter: FLOPs / 2;
    convolutions and matmuls, not norms or activations)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 3, input_size, input_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2


def step_gflops(step, n_images):
    """GFLOPs per image of one forward + backward `step()` (torch's FLOP counter: convolutions
    and matmuls, with the depthwise conv's backward counted right)."""
    from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

    def conv_backward(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                      transposed, _output_padding, _groups, output_mask, out_shape=None, **kwargs):
        # each of grad_input and grad_weight costs what the forward does; torch's own formula
        # transposes the weight's shape and so counts a depthwise conv's backward `groups`
        # times over (40x for atto's first stage)
        forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
        return forward * (int(output_mask[0]) + int(output_mask[1]))

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward}) as counter:
        step()
    return counter.get_total_flops() / n_images / 1e9


def train_step_gflops(models, input_size, device):
    """{finetune,pretrain}_gflops_per_img: one training step's forward + backward per image, at
    batch 2 (FCMAE with mask ratio 0.6); the gradients it leaves are cleared."""
    import torch.nn.functional as F
    x = torch.randn(2, 3, input_size, input_size, device=device)
    steps = {"finetune": lambda m: F.cross_entropy(m(x), torch.zeros(2, dtype=torch.long, device=device)).backward(),
             "pretrain": lambda m: m(x, mask_ratio=0.6)[0].backward()}
    out = {}
    for name, model in models.items():
        out[f"{name}_gflops_per_img"] = round(step_gflops(lambda: steps[name](model), 2), 3)
        model.zero_grad(set_to_none=True)
    return out


def _batches(a, device):
    """The prepared batches every contender trains on (on the device, in its memory format)."""
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(a.batch_size, 3, a.input_size, a.input_size, generator=g),
                torch.randint(0, 1000, (a.batch_size,), generator=g)) for _ in range(a.steps)]
    return [(x.to(device).contiguous(memory_format=fmt), y.to(device)) for x, y in batches]


def _plain_timm(a, ref, amp, crit):
    """The reference contender: a plain training loop over timm's own model, AdamW."""
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.05)
    ref_run = torch.compile(ref) if a.compile else ref

    def plain(bs):
        ref_run.train()
        for x, y in bs:
            with amp.autocast():
                loss = crit(ref_run(x), y)
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
    return plain


def build_contenders(a):
    import functools

    import timm
    import engine_finetune
    import engine_pretrain
    from models import create_fcmae, create_model
    from util.optim import create_optimizer
    from util.train_loop import Amp, train_one_epoch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the scripts do (util/run_context.start_process)
    batches = _batches(a, device)
    loader = InMemoryLoader(batches)
    amp = Amp.create(a.use_amp, device)
    opt_kw = {"weight_decay": 0.05, "opt_eps": 1e-8}

    def prep(m):
        m = m.to(device)
        return m.to(memory_format=torch.channels_last) if a.channels_last else m

    ours = prep(create_model(a.model, num_classes=1000))
    ours_opt = create_optimizer(ours, 1e-4, device, **opt_kw)
    ours_run = torch.compile(ours) if a.compile else ours
    crit = torch.nn.CrossEntropyLoss()
    st = _loop_args(a)
    fcmae = prep(create_fcmae(a.model, decoder_embed_dim=512))
    fcmae_opt = create_optimizer(fcmae, 1e-4, device, betas=(0.9, 0.95), **opt_kw)
    fcmae_run = torch.compile(fcmae) if a.compile else fcmae
    plain = _plain_timm(a, prep(timm.create_model(a.model, num_classes=1000)), amp, crit)

    def finetune(ld):
        train_one_epoch(ours_run, functools.partial(engine_finetune.classification_loss, criterion=crit), ld,
                        ours_opt, device, 0, st, amp)

    def pretrain(ld):
        train_one_epoch(fcmae_run, functools.partial(engine_pretrain.masked_loss, mask_ratio=0.6), ld,
                        fcmae_opt, device, 0, st, amp)

    def evaluate(ld):
        engine_finetune.evaluate(ld, ours_run, device, amp, reduce=False, channels_last=a.channels_last)

    one = InMemoryLoader(batches[:1])  # a contender's first step, timed alone
    n = a.steps * a.batch_size
    contenders = [Contender(name, lambda f=f: f(loader), lambda f=f: f(one), n)
                  for name, f in (("finetune", finetune), ("pretrain", pretrain), ("eval", evaluate))]
    contenders.append(Contender("plain_timm", lambda: plain(batches), lambda: plain(batches[:1]), n))
    return contenders, device, {"finetune": ours, "pretrain": fcmae}


# profiler keys (inclusive time) of the parts the summary names; GRN is our autograd Function
PROFILE_PARTS = {
    "grn": ("_GRNFunction", "autograd::engine::evaluate_function: _GRNFunctionBackward"),
    "layer_norm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "conv": ("aten::convolution", "aten::convolution_backward"),
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm"),
}


def profile_call(fn, device, path, rows=30):
    """torch.profiler over one more call `fn` (after the timed rounds). Writes the table of the
    top kernels by self device time (CPU: ops by self CPU time) to `path`; returns the summary
    for the JSON: total, the top 10 and the shares of PROFILE_PARTS (forward and backward)."""
    import contextlib
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), profile(activities=acts) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    with open(path, "w") as f:
        f.write(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                             row_limit=rows) + "\n")
    own = sorted(((e.self_device_time_total if cuda else e.self_cpu_time_total, e.key) for e in events
                  if not cuda or e.device_type == DeviceType.CUDA), reverse=True)
    total = sum(t for t, _ in own) or 1.0
    incl = {e.key: e.device_time_total if cuda else e.cpu_time_total for e in events}
    out = {"profile_kind": "cuda_kernels" if cuda else "cpu_ops", "profile_total_ms": round(total / 1e3, 3),
           "profile_top": [[k[:160], round(t / 1e3, 3), round(t / total, 4)] for t, k in own[:10]]}
    out.update({f"profile_{part}_share": round(sum(incl.get(k, 0) for k in keys) / total, 4)
                for part, keys in PROFILE_PARTS.items()})
    return out


def _settings(a, device):
    """What the figures were measured under (autocast dtype, cuDNN autotuning, compilation)."""
    from util.train_loop import Amp
    amp = Amp.create(a.use_amp, device)
    out = {"amp_dtype": str(amp.dtype).replace("torch.", "") if amp.enabled else None,
           "grad_scaler": amp.scaler.is_enabled(), "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if a.compile:
        try:
            from torch._dynamo.utils import counters
            out["compile_unique_graphs"] = int(counters["stats"]["unique_graphs"])
            out["compile_graph_breaks"] = int(sum(counters["graph_break"].values()))
        except (ImportError, KeyError, TypeError):
            pass
    return out


def bench_engines(a):
    import contextlib
    from util.speed import tune_allocator
    tuned = tune_allocator(True) if not a.no_malloc_tuning else False
    t0 = time.perf_counter()
    contenders, device, models = build_contenders(a)
    mem = PeakMemory(device)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # the engines' lines
        for c in contenders:  # each one's very first step, alone
            c.run_first(device)
        for c in contenders:  # a whole warm-up call (allocator, autotuning, shapes), untimed
            c.warm_up(device, mem)
        for _ in range(a.rounds or 5):
            for c in contenders:
                c.run(device, mem)
    elapsed = time.perf_counter() - t0
    prof = profile_call(contenders[0].fn, device, a.profile) if a.profile else {}  # fine-tuning
    macs = forward_macs(models["finetune"], a.input_size, device, a.channels_last)
    flops = train_step_gflops(models, a.input_size, device)
    out = {f"{c.name}_img_per_s": round(c.img_per_s(), 2) for c in contenders}
    out.update({f"{c.name}_page_faults_per_step": int(statistics.median(c.faults) / a.steps) for c in contenders})
    out["first_step_s"] = round(contenders[0].first_s, 3)  # fine-tuning, as the scripts' first step
    out.update({f"{c.name}_first_step_s": round(c.first_s, 3) for c in contenders})
    out["setup_s"] = round(elapsed - sum(c.first_s + c.warm_s + sum(c.times) for c in contenders), 2)
    mb = 2 ** 20
    out.update({f"{c.name}_peak_mem_mb": round(c.peak / mb, 1) for c in contenders if c.peak is not None})
    out.update({f"{c.name}_step_mem_mb": round(c.step_mem / mb, 1) for c in contenders if c.step_mem is not None})
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = [c.peak for c in contenders if c.peak is not None]
    out["peak_mem_mb"] = round(max(peaks) / mb if peaks else max_rss, 1)
    out["peak_mem_kind"] = ("cuda_max_memory_allocated" if device.type == "cuda" else
                            "malloc_in_use_sampled" if peaks else "max_rss")
    out["max_rss_mb"] = round(max_rss, 1)
    out["forward_gmacs"] = round(macs / 1e9, 4)
    out.update(flops, pretrain_flops_vs_finetune_flops=round(flops["pretrain_gflops_per_img"] / flops["finetune_gflops_per_img"], 3))
    tf, tf_from = peak_tflops(a, device)
    if tf:
        for key, name in (("mfu", "finetune"), ("plain_timm_mfu", "plain_timm")):
            out[key] = round(3 * 2 * macs * out[f"{name}_img_per_s"] / (tf * 1e12), 4)
        out.update(peak_tflops=tf, peak_tflops_from=tf_from)
    f, p = out["finetune_img_per_s"], out["plain_timm_img_per_s"]
    out.update(finetune_vs_plain=round(f / p, 3), pretrain_step_vs_finetune_step=round(f / out["pretrain_img_per_s"], 3),
               eval_vs_finetune=round(out["eval_img_per_s"] / f, 3))
    out.update(model=a.model, input_size=a.input_size, batch_size=a.batch_size, channels_last=a.channels_last,
               compile=a.compile, use_amp=a.use_amp, malloc_tuned=tuned, device=str(device),
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               threads=torch.get_num_threads(), torch=torch.__version__)
    out.update(_settings(a, device), **prof)
    return out


def checkpointing_contenders(a):
    """Our fine-tuning and FCMAE steps (the real epoch loop), each with and without gradient
    checkpointing, from the same weights and batches."""
    import functools

    import engine_finetune
    import engine_pretrain
    from models import create_fcmae, create_model
    from util.optim import create_optimizer
    from util.train_loop import Amp, train_one_epoch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = _batches(a, device)
    loader, one = InMemoryLoader(batches), InMemoryLoader(batches[:1])
    amp = Amp.create(a.use_amp, device)
    opt_kw = {"weight_decay": 0.05, "opt_eps": 1e-8}
    crit = torch.nn.CrossEntropyLoss()
    losses = {"finetune": functools.partial(engine_finetune.classification_loss, criterion=crit),
              "pretrain": functools.partial(engine_pretrain.masked_loss, mask_ratio=0.6)}
    contenders = []
    for kind, build in (("finetune", functools.partial(create_model, a.model, num_classes=1000)),
                        ("pretrain", functools.partial(create_fcmae, a.model, decoder_embed_dim=512))):
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = build(grad_checkpointing=ckpt).to(device)
            opt = create_optimizer(model, 1e-4, device, betas=(0.9, 0.95) if kind == "pretrain" else None,
                                   **opt_kw)
            def step(ld, model=model, opt=opt, loss=losses[kind]):
                train_one_epoch(model, loss, ld, opt, device, 0, _loop_args(a), amp)
            name = kind + ("_grad_ckpt" if ckpt else "")
            contenders.append(Contender(name, lambda f=step: f(loader), lambda f=step: f(one),
                                        a.steps * a.batch_size))
    return contenders, device


def _step_time_and_memory(a, contenders, device):
    """{<name>_step_s, <name>_step_mem_mb} of each contender: first steps, a measured warm-up,
    then --rounds timed round-robin (as bench_engines)."""
    import contextlib
    mem = PeakMemory(device)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        for c in contenders:
            c.run_first(device)
        for c in contenders:
            c.warm_up(device, mem)
        for _ in range(a.rounds or 5):
            for c in contenders:
                c.run(device, mem)
    mb, out = 2 ** 20, {}
    for c in contenders:
        out[f"{c.name}_step_s"] = round(statistics.median(c.times) / a.steps, 4)
        out[f"{c.name}_step_mem_mb"] = round(c.step_mem / mb, 1) if c.step_mem is not None else None
    return out


def bench_checkpointing(a):
    """Step memory (the step's own: activations, gradients, temporaries) and step time with and
    without --grad_checkpointing, timed round-robin as bench_engines."""
    from util.speed import tune_allocator
    tuned = tune_allocator(True) if not a.no_malloc_tuning else False
    contenders, device = checkpointing_contenders(a)
    out = _step_time_and_memory(a, contenders, device)
    for kind in ("finetune", "pretrain"):
        plain, ckpt = kind, f"{kind}_grad_ckpt"
        out[f"{ckpt}_time_ratio"] = round(out[f"{ckpt}_step_s"] / out[f"{plain}_step_s"], 3)
        if out[f"{plain}_step_mem_mb"]:
            out[f"{ckpt}_mem_ratio"] = round(out[f"{ckpt}_step_mem_mb"] / out[f"{plain}_step_mem_mb"], 3)
    out.update(model=a.model, input_size=a.input_size, batch_size=a.batch_size, use_amp=a.use_amp, device=str(device),
               peak_mem_kind="cuda_max_memory_allocated" if device.type == "cuda" else "malloc_in_use_sampled",
               malloc_tuned=tuned, threads=torch.get_num_threads(), torch=torch.__version__)
    return out


def bench_linear_probe(a):
    """Step memory and time of a linear probe (--linear_probe: the network frozen, its forward
    recording no graph; only the head in the optimizer) against full fine-tuning of the same
    model, both built by engine_finetune.build_model from the real flags and trained by the real
    epoch loop with the Task's loss (the probe's frozen part in evaluation mode), AdamW."""
    import functools

    import engine_finetune
    from main_finetune import get_args_parser
    from util.config import parse_args
    from util.optim import create_optimizer
    from util.speed import tune_allocator
    from util.train_loop import Amp, train_one_epoch
    tuned = tune_allocator(True) if not a.no_malloc_tuning else False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batches = _batches(a, device)
    loader, one = InMemoryLoader(batches), InMemoryLoader(batches[:1])
    amp = Amp.create(a.use_amp, device)
    contenders, trainable = [], {}
    for name, probe in (("finetune", False), ("linear_probe", True)):
        args = parse_args(get_args_parser(), ["--model", a.model, "--linear_probe", str(probe),
                                              "--smoothing", "0", "--drop_path", "0"])
        torch.manual_seed(0)
        model = engine_finetune.build_model(args, 1000).to(device)
        opt = create_optimizer(model, 1e-4, device, weight_decay=0.05, opt_eps=1e-8)
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = engine_finetune.frozen_parts(model, model.get_submodule(engine_finetune.classifier_name(model))) \
            if probe else ()

        def loss(m, batch, frozen=frozen):  # FinetuneTask.loss with plain cross-entropy
            engine_finetune.keep_frozen_in_eval(frozen)
            return engine_finetune.classification_loss(m, batch, torch.nn.CrossEntropyLoss())

        def step(ld, model=model, opt=opt, loss=loss):
            train_one_epoch(model, loss, ld, opt, device, 0, _loop_args(a), amp)
        contenders.append(Contender(name, functools.partial(step, loader), functools.partial(step, one),
                                    a.steps * a.batch_size))
    out = _step_time_and_memory(a, contenders, device)
    out["linear_probe_time_ratio"] = round(out["linear_probe_step_s"] / out["finetune_step_s"], 3)
    if out["finetune_step_mem_mb"]:
        out["linear_probe_mem_ratio"] = round(out["linear_probe_step_mem_mb"] / out["finetune_step_mem_mb"], 3)
    out.update({f"{k}_trainable_params": v for k, v in trainable.items()})
    out.update(model=a.model, input_size=a.input_size, batch_size=a.batch_size, use_amp=a.use_amp, device=str(device),
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               peak_mem_kind="cuda_max_memory_allocated" if device.type == "cuda" else "malloc_in_use_sampled",
               malloc_tuned=tuned, threads=torch.get_num_threads(), torch=torch.__version__)
    return out


def bench_data(a):
    """Our training data pipeline (uint8 + --jpeg_draft) against torchvision ImageFolder + timm's
    create_transform, on --data_path or a generated ImageNet-like JPEG set (benchmarks/bench_data.py)."""
    from benchmarks.bench_data import run_on
    return run_on(a.data_path, a.data_images, workers=[w for w in a.workers if w > 0] or [1],
                  input_size=a.input_size, rounds=a.rounds or 3)


def bench_startup(a):
    """Seconds from the README demo command to its first logged training step, and from a mistaken
    command to its exit with the one error line (median of 3 runs each; issue 16, item 10)."""
    script = os.path.join(ROOT, "main_finetune.py")
    with tempfile.TemporaryDirectory() as d:
        bad = os.path.join(d, "bad.yaml")
        with open(bad, "w") as f:
            f.write("batch_size: 0\n")
        errors = {"error_s": ["--lrr", "1e-3"],  # a mistyped flag
                  "error_missing_path_s": ["--data_set", "image_folder", "--data_path", os.path.join(d, "nowhere")],
                  "error_bad_config_s": ["--config", bad]}
        out = {}
        for key, argv in errors.items():
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, script, *argv, "--output_dir", os.path.join(d, "e")],
                                   capture_output=True, text=True, cwd=ROOT)
                times.append(time.perf_counter() - t0)
                assert p.returncode == 2 and p.stderr.startswith("error: "), p.stderr[-2000:]
            out[key] = round(statistics.median(times), 3)
        cmd = [sys.executable, script, "--config",
               os.path.join(ROOT, "configs", "demo_finetune.yaml"), "--print_freq", "1", "--output_dir", d]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        first = None
        for line in p.stdout:
            if line.startswith("train epoch 0 [1/"):
                first = time.perf_counter() - t0
                break
        p.kill()
        p.wait()
        return {"demo_first_step_s": round(first, 2) if first else None, **out}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="steps per timed call")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 5; 3 with --data_pipeline)")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--use_amp", action="store_true")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's dense bf16 peak for the MFU estimate (default: a table of known GPUs)")
    p.add_argument("--no_malloc_tuning", action="store_true", help="keep glibc's default allocator settings")
    p.add_argument("--data_pipeline", action="store_true", help="measure JPEG decode + augmentation instead")
    p.add_argument("--data_path", default=None, help="--data_pipeline: an image folder (train/<class>/*.jpg; "
                   "default: a generated one of --data_images JPEGs)")
    p.add_argument("--data_images", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--startup", action="store_true", help="measure the README demo's time to first step, and a mistake's time to its error line")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--grad_checkpointing", action="store_true",
                   help="step memory and time of our fine-tuning and FCMAE steps with and without it instead")
    p.add_argument("--linear_probe", action="store_true",
                   help="step memory and time of a linear probe (--linear_probe) against full fine-tuning instead")
    p.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    p.add_argument("--profile", metavar="FILE", help="after the timed rounds, profile one more fine-tuning call "
                   "(torch.profiler): the top-kernels table to FILE, a summary (GRN, LayerNorm shares) in the JSON")
    a = p.parse_args()
    if a.grad_checkpointing:
        out = bench_checkpointing(a)
    elif a.linear_probe:
        out = bench_linear_probe(a)
    else:
        out = bench_data(a) if a.data_pipeline else bench_startup(a) if a.startup else bench_engines(a)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:36s} {v}")


if __name__ == "__main__":
    main()
