"""Resumable distributed samplers and the DataLoaders built on them.

Augmentation randomness is seeded per sample from (seed, epoch, index), so the images of a step
do not depend on the number of workers, on the rank layout or on where a run was resumed: the
basis of exact resume and of the DDP-equivalence tests.
"""
import functools
import os
import random
import signal
import sys
import threading

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class SeededTransform(Dataset):
    """Wraps a dataset so that the sampler's (index, seed) keys seed each sample's augmentation.
    `with_seed`: samples also carry their seed, for what is random on the device
    (util/data/device_batches.py)."""

    def __init__(self, dataset, with_seed=False):
        self.dataset, self.with_seed = dataset, with_seed

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        sample = self._sample(*key)
        return (*sample, key[1]) if self.with_seed else sample

    def _sample(self, index, seed):
        in_worker = torch.utils.data.get_worker_info() is not None
        if in_worker:
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.manual_seed(seed)
            return self.dataset[index]
        # single-process loading: keep the training process's own RNG streams untouched
        py, npst = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.manual_seed(seed)
            out = self.dataset[index]
        random.setstate(py)
        np.random.set_state(npst)
        return out


class TrainSampler(Sampler):
    """Shuffled, rank-sliced, resumable: yields (index, augmentation seed) keys.

    Global order = permutation(seed, epoch), padded to a multiple of the world size; rank r takes
    positions r, r+W, ... so W ranks x batch B see exactly what 1 rank x batch W*B sees.
    `set_epoch(e, start=k)` skips the first k samples of this rank (resume mid-epoch).
    """

    def __init__(self, n, num_replicas=1, rank=0, seed=0, shuffle=True):
        self.n, self.world, self.rank, self.seed, self.shuffle = n, num_replicas, rank, seed, shuffle
        self.epoch, self.start = 0, 0
        self.num_samples = -(-n // num_replicas)

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = int(epoch), int(start)

    def order(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        idx += idx[: self.num_samples * self.world - self.n]
        return idx[self.rank::self.world]

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for i in self.order()[self.start:]:
            yield i, (base + i) % (2 ** 62)

    def __len__(self):
        return self.num_samples - self.start


def eval_indices(n, num_replicas=1, rank=0):
    """Rank r takes samples r, r+W, ...: no padding, so summed counts are exact."""
    return range(rank, n, num_replicas)


def build_train_loader(dataset, args, world_size, rank, with_seeds=False):
    sampler = TrainSampler(len(dataset), world_size, rank, seed=args.seed)
    return _loader(SeededTransform(dataset, with_seeds), sampler, args, drop_last=True)


def build_eval_loader(dataset, args, world_size, rank):
    if args.dist_eval:
        sampler = eval_indices(len(dataset), world_size, rank)
    else:  # every rank evaluates everything; only counts from rank 0 matter
        sampler = eval_indices(len(dataset))
    return _loader(dataset, sampler, args, drop_last=False, batch_size=int(1.5 * args.batch_size))


def _leave_stop_signals_to_the_trainer(worker_id, rank):
    """A loader worker leaves stop signals to the training process, which stops at a step
    boundary (util/preemption.py) and ends its workers itself. torchrun's agent signals a rank's
    whole process group, and torch's worker handler ends a worker on a SIGTERM from anyone but
    its parent: the rank then failed on a dead worker instead of stopping (a preemption, a
    teardown after a peer died). So the worker takes a process group of its own (its parent's
    SIGTERM, at exit, still ends it) and ignores SIGUSR2. Slurm signals every process of a job
    (preemption, scancel, the time limit), whatever its group: so a SIGTERM is taken from a
    thread that asks who sent it (a Python handler cannot), ending the worker when its rank sent
    it (`rank`: its pid; a forkserver, not the rank, may be the worker's parent) and ignoring it
    otherwise. On Linux it also dies with its parent: a worker outliving a
    killed rank holds that rank's sockets open, so its peers would wait for torch's 5-s parent
    check before their collectives fail and they can stop."""
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no Python API has it
    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads made later inherit it

        def end_on_the_ranks_sigterm():
            while signal.sigwaitinfo({signal.SIGTERM}).si_pid != rank:
                pass
            os._exit(0)  # what torch's own handler does on its parent's SIGTERM
        threading.Thread(target=end_on_the_ranks_sigterm, daemon=True).start()


def _loader(dataset, sampler, args, drop_last, batch_size=None):
    workers = args.num_workers
    kw = dict(persistent_workers=True, prefetch_factor=4) if workers > 0 else {}
    # its own generator: creating an iterator must not draw from the training RNG (exact resume)
    kw["generator"] = torch.Generator().manual_seed(args.seed)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size or args.batch_size,
                      num_workers=workers, pin_memory=args.pin_mem and torch.cuda.is_available(),
                      drop_last=drop_last, worker_init_fn=functools.partial(_leave_stop_signals_to_the_trainer, rank=os.getpid()), **kw)
