"""Peak memory of a 2-process gloo DDP training step, with and without gradient_as_bucket_view.

    python benchmarks/bench_ddp_memory.py --model convnextv2_tiny --input_size 64 --batch_size 4

Each contender runs in its own pair of fresh processes (so neither inherits the other's heap):
the model as util/trainer.place_model wraps it, AdamW, `--steps` steps; each rank reports its
peak resident memory (ru_maxrss) and the parameters' size; the JSON gives rank 0's figures.
"""
import argparse
import json
import os
import resource
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def worker(rank, a, port, bucket_view, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from models import create_model
    from util.optim import create_optimizer
    model = create_model(a.model, num_classes=1000)
    for m in model.modules():  # as place_model does for our models
        if isinstance(m, torch.nn.Conv2d):
            m.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = create_optimizer(model, 1e-4, torch.device("cpu"), weight_decay=0.05, opt_eps=1e-8)
    x = torch.randn(a.batch_size, 3, a.input_size, a.input_size)
    y = torch.randint(0, 1000, (a.batch_size,))
    for _ in range(a.steps):
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # as util/train_loop does
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    out.put((rank, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, params_mb))
    dist.destroy_process_group()


def run(a, bucket_view):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, a, port, bucket_view, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnextv2_tiny")
    p.add_argument("--input_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    out = {"model": a.model, "input_size": a.input_size, "batch_size": a.batch_size, "world_size": 2, "backend": "gloo"}
    for name, view in (("copy", False), ("bucket_view", True)):
        (_, rss, params_mb), _ = run(a, view)
        out[f"{name}_peak_rss_mb"] = round(rss, 1)
        out["params_mb"] = round(params_mb, 1)
    out["saved_mb"] = round(out["copy_peak_rss_mb"] - out["bucket_view_peak_rss_mb"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
