"""Console progress lines, the per-epoch JSON log (log.txt) and TensorBoard, rank 0 only."""
import datetime
import json
import os
import time

from util.distributed import is_main_process
from util.errors import UserError


class StepMeter:
    """Running averages of named scalars, one timm AverageMeter each, in the order first seen;
    values are Python floats read only on logging steps. A scalar summed on the device at every
    step (the loss) gets its average over all the steps so far with `set_average`, so the console
    shows the average that log.txt records for the epoch."""

    def __init__(self):
        self.meters = {}
        self.exact = {}  # name -> average over every step so far (not only the logged ones)

    def set_average(self, k, avg):
        self.exact[k] = avg

    def update(self, n=1, **values):
        from timm.utils import AverageMeter  # timm's import is slow; this module is not
        for k, v in values.items():
            self.meters.setdefault(k, AverageMeter()).update(float(v), n)

    @property
    def last(self):
        return {k: m.val for k, m in self.meters.items()}

    def avg(self, k):
        if k in self.exact:
            return self.exact[k]
        return self.meters[k].avg if k in self.meters else 0.0

    def averages(self):
        return {k: self.avg(k) for k in self.meters}


def progress_line(header, step, total, start_time, step_in_run, meter, img_per_s, data_wait=None):
    """One console line: progress, eta, each meter's last value (average), img/s and the share
    of the time since the last line spent waiting for data."""
    elapsed = time.time() - start_time
    eta = elapsed / max(step_in_run, 1) * (total - step)
    parts = [f"{header} [{step}/{total}]", f"eta {datetime.timedelta(seconds=int(eta))}"]
    for k, v in meter.last.items():
        parts.append(f"{k} {v:.4g} ({meter.avg(k):.4g})")
    parts.append(f"{img_per_s:.1f} img/s")
    if data_wait is not None:
        parts.append(f"data {100 * data_wait:.0f}%")
    return "  ".join(parts)


class TensorBoard:
    """A SummaryWriter on rank 0 (nothing elsewhere); `purge_step` drops events past a resume
    point so a resumed run does not show duplicate steps."""

    def __init__(self, log_dir, purge_step=None):
        self.writer = None
        if log_dir and is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def scalars(self, step, prefix="", **values):
        if self.writer:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(f"{prefix}{k}", v, step)

    def image(self, tag, img, step):
        if self.writer:
            self.writer.add_image(tag, img, step)

    def flush(self):
        if self.writer:
            self.writer.flush()

    def close(self):
        if self.writer:
            self.writer.close()


def append_json_log(output_dir, stats):
    if output_dir and is_main_process():
        path = os.path.join(output_dir, "log.txt")
        try:
            with open(path, "a") as f:
                f.write(json.dumps(stats) + "\n")
        except OSError as e:
            raise UserError(f"could not write {path} ({e.strerror or e}); free disk space or choose "
                            "another --output_dir; the checkpoints are intact") from None
