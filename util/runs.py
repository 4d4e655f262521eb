"""Run directories named by what they compute, and run.json, the record of each run.

A run's *signature* is a hash of the settings that change its result. Launching the same
settings again finds the same directory and resumes it; a completed one is refused unless
--force. See docs/runs.md.

Global batch rule: batch_size, update_freq and world_size enter the signature only as their
product, `global_batch`. 1 GPU x 64, 2 GPUs x 32 and 1 GPU x 32 x update_freq 2 are the same
run: the recipe (lr = blr * global_batch / 256, the schedule, the optimizer steps) is the same
and ConvNeXt V2 has no batch statistics; only floating-point rounding and the order samples
are drawn in differ, which is what moving a run to another machine changes anyway.
Likewise lr and blr enter only as the effective lr (blr * global_batch / 256 unless --lr).
"""
import argparse
import datetime
import functools
import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys

from util import flags
from util.config import RUNTIME_ATTRS, flag_dests, load_yaml
from util.errors import UserError, user_errors

SIGNATURE_VERSION = 3  # bump when the signature's meaning changes (a default included); see docs/runs.md
KINDS = ("finetune", "pretrain")
STATUSES = ("running", "completed", "failed", "preempted", "pruned", "interrupted")  # pruned: stopped by a
# search; interrupted: the group broke under the run (a rank died), it resumes when started again
DEFAULT_ROOT = "runs"
RECORD = "run.json"
CONFIG = "config.yaml"


def outcome_defaults():
    """{"<script> --<flag>": default} of every outcome flag. A signature names the settings that
    differ from these defaults, so changing one changes what signatures mean: tests/test_runs.py
    keeps the defaults SIGNATURE_VERSION was made with (tests/fixtures/outcome_defaults_v3.json)
    and fails on a changed one; a new flag is added to that record, with no version bump."""
    return {f"{kind} --{f.name}": flags.canonical(f.default_for(kind)) for f in flags.TABLE
            if f.role == flags.OUTCOME for kind in f.scripts if kind in KINDS}


# Settings that do not change what a run computes: every flag of the table whose role is not
# OUTCOME (util/flags.py). Anything else counts (safer), a flag the table does not know too.
OUTCOME_EXCLUDED = flags.not_outcome() | RUNTIME_ATTRS


class RunCompleted(Exception):
    """The run these settings name has completed; the caller prints the message and exits 0."""

    def __init__(self, message, run_dir=None, record=None):
        super().__init__(message)
        self.run_dir, self.record = run_dir, record


# ---------------------------------------------------------------- signature

def outcome_settings(args, world_size):
    """Every outcome-changing setting, with batch_size x update_freq x world_size as
    `global_batch` and lr and blr as the effective `lr`."""
    dests = flag_dests(args)
    out = {k: flags.canonical(v) for k, v in vars(args).items()
           if (dests is None or k in dests) and k not in OUTCOME_EXCLUDED
           and not k.startswith("_")}
    global_batch = None
    if getattr(args, "batch_size", None) is not None:  # absent from a bare Namespace
        out.pop("batch_size", None)
        out.pop("update_freq", None)
        global_batch = args.batch_size * (getattr(args, "update_freq", None) or 1) * int(world_size)
        out["global_batch"] = global_batch
    # Only the effective lr matters: `--lr X` and the blr that gives X are the same run, and so
    # is an lr derived from blr (util/optim.effective_lr) before asking.
    if "lr" in out or "blr" in out:
        lr, blr = out.pop("lr", None), out.pop("blr", None)
        if lr is None and blr is not None and global_batch is not None:
            lr = blr * global_batch / 256
        if lr is None:
            out["blr"] = blr
        out["lr"] = None if lr is None else flags.canonical(float(f"{float(lr):.12g}"))
    return out


def _is_default(name, value, kind):
    flag = flags.BY_NAME.get(name)
    return (flag is not None and kind in flag.scripts
            and flags.canonical(flag.default_for(kind)) == value)


def settings(args, world_size, kind):
    """The settings the signature hashes: the outcome settings that differ from their default
    in the flag table (experimaestro's rule: a new flag whose default keeps today's behaviour
    changes no signature), and always `global_batch` and the effective `lr`."""
    return {k: v for k, v in outcome_settings(args, world_size).items()
            if k in ("global_batch", "lr") or not _is_default(k, v, kind)}


def _hash(kind, hashed, version):
    blob = json.dumps({"kind": kind, "settings": hashed, "version": version}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def signature(args, world_size, kind):
    """sha256 hex of the canonical JSON of `settings(args, world_size, kind)`, the kind and a salt."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _hash(kind, settings(args, world_size, kind), SIGNATURE_VERSION)


def _model_part(args):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(args.model or "run"))


def run_name(args, world_size, kind):
    """`<model>-<first 10 hex of the signature>`."""
    return f"{_model_part(args)}-{signature(args, world_size, kind)[:10]}"


# Version 2 hashed every outcome flag the script had, default or not, so each new flag changed
# every signature. Its runs are still found (prepare_run_dir): their signature is computed from
# the flags version 2 knew, frozen here, as long as every flag added since is at its default
# (otherwise version 2 could not have made the run). batch_size, update_freq, lr and blr enter as
# global_batch and the effective lr, as in version 3.
V2_FLAGS = {
    "finetune": frozenset((
        "aa", "batch_size", "blr", "clip_grad", "color_jitter", "crop_pct", "cutmix", "cutmix_minmax",
        "data_path", "data_set", "disable_eval", "drop_path", "epochs", "eval_data_path", "finetune",
        "head_init_scale", "imagenet_default_mean_and_std", "input_size", "layer_decay",
        "layer_decay_type", "lr", "min_lr", "mixup", "mixup_mode", "mixup_prob", "mixup_switch_prob",
        "model", "model_ema", "model_ema_decay", "model_ema_eval", "model_key", "model_prefix",
        "momentum", "opt", "opt_betas", "opt_eps", "recount", "remode", "reprob", "resplit", "scale",
        "seed", "smoothing", "synthetic_classes", "synthetic_seed", "synthetic_train_samples",
        "synthetic_val_samples", "train_interpolation", "update_freq", "use_amp", "warmup_epochs",
        "warmup_steps", "weight_decay", "weight_decay_end")),
    "pretrain": frozenset((
        "batch_size", "blr", "clip_grad", "crop_pct", "data_path", "data_set", "decoder_depth",
        "decoder_embed_dim", "epochs", "imagenet_default_mean_and_std", "input_size", "lr",
        "mask_ratio", "min_lr", "model", "norm_pix_loss", "seed", "synthetic_classes",
        "synthetic_seed", "synthetic_train_samples", "synthetic_val_samples", "update_freq",
        "use_amp", "warmup_epochs", "warmup_steps", "weight_decay")),
}


def legacy_signature(args, world_size, kind):
    """The version-2 signature of these settings, or None when version 2 could not have made
    the run (a flag it did not have is set away from its default, or one it had is gone)."""
    known, hashed = V2_FLAGS[kind], {}
    for name, value in outcome_settings(args, world_size).items():
        if name in known or name in ("global_batch", "lr", "blr"):
            hashed[name] = value
        elif not _is_default(name, value, kind):
            return None
    if any(name not in hashed for name in known - {"batch_size", "update_freq", "lr", "blr"}):
        return None
    return _hash(kind, hashed, 2)


# ---------------------------------------------------------------- run directory

def _siblings(base):
    """{n: path} of base (n=1) and its --force siblings base-r2, base-r3, ..."""
    parent, name = os.path.split(base)
    pattern = re.compile(re.escape(name) + r"(?:-r(\d+))?")
    found = {}
    if os.path.isdir(parent or "."):
        for entry in os.listdir(parent or "."):
            m = pattern.fullmatch(entry)
            n = int(m.group(1) or 1) if m else 0
            if n and (n >= 2 or not m.group(1)) and os.path.isdir(os.path.join(parent, entry)):
                found[n] = os.path.join(parent, entry)
    return found


def _best_text(record):
    best = (record or {}).get("best_metric") or {}
    if best.get("value") is None:
        return "no best metric recorded"
    return f"best {best.get('name') or 'metric'} {best['value']:.4g}"


def prepare_run_dir(args, kind, world_size):
    """The directory this run uses (created); pure given the filesystem, so call it on rank 0
    and broadcast the answer (a --force on every rank would race for the next suffix).

    - `args.output_dir` set: that directory, as is; refused when it holds a run of other
      settings (check_holds_this_run); RunCompleted when its run completed.
    - else `<runs_root>/<kind>/<model>-<sig10>`, or its newest --force sibling `-rN`, or, when
      none exists, the run version 2 of the signature named; raises RunCompleted when that one
      completed (not for `--eval`: evaluating is fine).
    - `args.force`: a fresh sibling after the newest (`-r2`, `-r3`, ...). The caller must point
      relaunches (requeue) at the chosen directory with `output_dir`, or they fork again.
    """
    if args.output_dir:
        if args.force:
            raise UserError(f"--force starts a fresh run beside the one its settings name; with "
                            f"--output_dir, give a new folder instead of {args.output_dir}")
        record = check_holds_this_run(args.output_dir, args, world_size, kind)
        if record.get("status") == "completed" and not args.eval:
            raise RunCompleted(f"run already completed: {args.output_dir} ({_best_text(record)}); "
                               "give another --output_dir to train again", args.output_dir, record)
        os.makedirs(args.output_dir, exist_ok=True)
        return str(args.output_dir)
    root = os.path.join(args.runs_root or DEFAULT_ROOT, kind)
    base = os.path.join(root, run_name(args, world_size, kind))
    found = _siblings(base)
    old = None if found or args.force else legacy_signature(args, world_size, kind)
    if old:  # the run version 2 of the signature named: an upgrade must not start it over
        old_base = os.path.join(root, f"{_model_part(args)}-{old[:10]}")
        if _siblings(old_base):
            base, found = old_base, _siblings(old_base)
    newest = max(found) if found else None
    if args.force:
        path = base if newest is None else f"{base}-r{newest + 1}"
    else:
        path = base if newest is None else found[newest]
        record = RunRecord.load(path)
        if record and record.get("status") == "completed" and not args.eval:
            raise RunCompleted(f"run already completed: {path} ({_best_text(record)}); "
                               "pass --force to start a fresh run beside it", path, record)
    os.makedirs(path, exist_ok=True)
    return path


def check_holds_this_run(path, args, world_size, kind):
    """A given --output_dir that already holds a run must hold this one: a launch with other
    settings would resume from that run's checkpoints and overwrite them. Settings are compared
    by value with the folder's config.yaml (not by signature), so a run made by older code,
    before a flag was added, is still continued. Returns the folder's run.json (or {})."""
    if args.eval or not os.path.isdir(path):
        return {}  # evaluating writes only eval.json
    record = RunRecord.load(path) or {}
    if record.get("kind") not in (None, kind):
        raise UserError(f"--output_dir {path} holds a {record['kind']} run; choose another --output_dir")
    config = os.path.join(path, CONFIG)
    if not os.path.isfile(config):
        return record
    old = outcome_settings(argparse.Namespace(**load_yaml(config)), record.get("world_size") or world_size)
    new = outcome_settings(args, world_size)
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    if changed:
        shown = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UserError(f"--output_dir {path} holds a run with other settings ({shown}{more}); "
                        f"continue it with --config {config}, or give a new --output_dir (add "
                        f"--resume {os.path.join(path, 'checkpoint-last.pth')} to start from its weights)")
    return record


# ---------------------------------------------------------------- run record

def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@functools.lru_cache(maxsize=1)
def git_state():
    """(commit, dirty) of the repository this code lives in; (None, None) outside git.

    Untracked files do not count as dirty: run directories inside the checkout would
    otherwise mark every run.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", here, "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=30)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return commit.stdout.strip(), dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def versions():
    import platform
    out = {"python": platform.python_version(), "torch": None, "timm": None, "cuda": None,
           "cudnn": None}
    try:
        import torch
        out.update(torch=torch.__version__, cuda=torch.version.cuda)
        if torch.backends.cudnn.is_available():
            out["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # a record must not stop a run
        pass
    try:
        import timm
        out["timm"] = timm.__version__
    except Exception:
        pass
    return out


def slurm_info():
    """Slurm job ids and restart count from the environment, or None outside Slurm."""
    env = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID",
           "array_task_id": "SLURM_ARRAY_TASK_ID", "restart_count": "SLURM_RESTART_COUNT"}
    out = {k: os.environ[v] for k, v in env.items() if os.environ.get(v)}
    if "restart_count" in out and out["restart_count"].isdigit():
        out["restart_count"] = int(out["restart_count"])
    return out or None


DEFAULT_METRIC = {"finetune": "acc1", "pretrain": "loss"}
_RESERVED = frozenset({
    "format", "name", "run_dir", "kind", "signature", "signature_version", "status", "reason",
    "git_commit", "git_dirty", "command", "hostnames", "world_size", "versions", "slurm",
    "started", "ended", "updated", "epoch", "step", "total_epochs", "best_metric", "restarts", "torchrun"})


class RunRecord:
    """`<run_dir>/run.json`: provenance, status and progress, rewritten atomically by rank 0.

    Fields written earlier (first start time, best metric, extras) are kept across restarts.
    `epoch`, `step` are the position reached, as a resume would start from it: the 0-based
    epoch in progress and the step inside it; after epoch e ends, (e + 1, 0). So with step 0,
    `epoch` counts finished epochs, and `python -m util.runs` shows `epoch/total_epochs`.
    """

    def __init__(self, run_dir, args, kind, world_size=1, is_main=True, hostnames=None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.run_dir, self.args, self.kind = str(run_dir), args, kind
        self.world_size, self.is_main = int(world_size), bool(is_main)
        self.hostnames = list(hostnames) if hostnames else [socket.gethostname()]
        self.path = os.path.join(self.run_dir, RECORD)
        self.signature = signature(args, self.world_size, kind)
        self.data = (self.load(self.run_dir) or {}) if self.is_main else {}

    @staticmethod
    def load(run_dir):
        """run.json of `run_dir` as a dict, or None when there is none."""
        path = os.path.join(run_dir, RECORD)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is unreadable ({e}); fix or delete it") from None
        return data if isinstance(data, dict) else None

    def _extra(self, extra):
        bad = sorted(set(extra) & _RESERVED)
        if bad:
            raise ValueError(f"run.json fields {bad} are set by RunRecord itself")
        self.data.update(extra)

    def _write(self):
        self.data["updated"] = _now()
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            from models.atomic import atomic_write_json  # not at import: the cheap checks load no models/
            atomic_write_json(self.path, self.data)
        except OSError as e:
            raise UserError(f"could not write {self.path} ({e.strerror or e}); free disk space or choose "
                            "another --output_dir; the checkpoints are intact") from None

    def start(self, resumed=False, start_epoch=0, start_step=0, **extra):
        """Mark the run running and append this launch to `restarts`."""
        if not self.is_main:
            return
        from util.distributed import torchrun_attempt  # not at import: the cheap checks load no torch
        now, d = _now(), self.data
        commit, dirty = git_state()
        sig = self.signature
        # how the launch before ended, as it left the record: "running" when it was killed outright
        previous = {k: d.get(k) for k in ("status", "reason", "epoch", "step", "updated")} if d.get("status") else None
        d.update(format=1, name=os.path.basename(os.path.abspath(self.run_dir)),
                 run_dir=os.path.abspath(self.run_dir), kind=self.kind, signature=sig,
                 signature_version=SIGNATURE_VERSION, status="running", reason=None, ended=None,
                 git_commit=commit, git_dirty=dirty, command=shlex.join(sys.argv),
                 hostnames=self.hostnames, world_size=self.world_size, versions=versions(),
                 slurm=slurm_info(), torchrun=torchrun_attempt(), epoch=int(start_epoch), step=int(start_step),
                 total_epochs=self.args.epochs)
        d.setdefault("started", now)
        d.setdefault("best_metric", None)
        d.setdefault("restarts", []).append({
            "time": now, "resumed": bool(resumed), "start_epoch": int(start_epoch),
            "start_step": int(start_step), "world_size": self.world_size,
            "hostnames": self.hostnames, "slurm": d["slurm"], "torchrun": d["torchrun"], "git_commit": commit,
            "signature": sig, "previous": previous})
        self._extra(extra)
        self._write()

    def update(self, epoch=None, step=None, best_metric=None, metric_name=None, **extra):
        """Record progress. `best_metric`: the best value so far, a number (named by
        `metric_name`, else the earlier name, else acc1 / loss) or a dict with `value`, `name`
        and anything else (e.g. `epoch`); a value of None leaves the record as it was."""
        if not self.is_main:
            return
        if epoch is not None:
            self.data["epoch"] = int(epoch)
        if step is not None:
            self.data["step"] = int(step)
        best = dict(best_metric) if isinstance(best_metric, dict) else {"value": best_metric}
        if best.get("value") is not None:
            old = self.data.get("best_metric") or {}
            best["name"] = best.get("name") or metric_name or old.get("name") \
                or DEFAULT_METRIC[self.kind]
            best["value"] = float(best["value"])
            self.data["best_metric"] = best
        self._extra(extra)
        self._write()

    def finish(self, status, reason=None, **extra):
        """Final status: completed | failed | preempted | pruned | interrupted (reason: why it stopped)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"finish status must be one of {STATUSES[1:]}, got {status!r}")
        if not self.is_main:
            return
        self.data.update(status=status, reason=reason, ended=_now())
        self._extra(extra)
        self._write()


# ---------------------------------------------------------------- CLI

def find_runs(root, max_depth=4):
    """[(run_dir, record)] for every run.json under root, at most max_depth folders down."""
    if not os.path.isdir(root):
        raise UserError(f"no such directory: {root}")
    out = []
    root_depth = os.path.abspath(root).rstrip(os.sep).count(os.sep)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = os.path.abspath(dirpath).rstrip(os.sep).count(os.sep) - root_depth
        if RECORD in filenames:
            record = RunRecord.load(dirpath)
            if record is not None:
                out.append((dirpath, record))
            dirnames[:] = []  # a run's own folders hold no runs
        elif depth >= max_depth:
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return out


def _parse_time(s):
    try:
        return datetime.datetime.fromisoformat(s).timestamp()
    except (TypeError, ValueError):
        return 0.0


def _row(run_dir, r):
    total, epoch = r.get("total_epochs"), r.get("epoch")
    if total is None:  # a run.json without it: its config.yaml
        try:
            total = load_yaml(os.path.join(run_dir, CONFIG)).get("epochs")
        except UserError:
            pass
    if epoch is None:
        progress = "-"
    elif total:
        progress = f"{epoch}/{total}"
    else:
        progress = str(epoch)
    best = r.get("best_metric") or {}
    best = f"{best.get('name')}={best['value']:.4g}" if best.get("value") is not None else "-"
    t = _parse_time(r.get("updated"))
    updated = datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else "-"
    return [r.get("name") or os.path.basename(run_dir), (r.get("signature") or "-")[:10],
            r.get("kind") or "-", r.get("status") or "-", progress, best, updated]


def list_runs(root, status=None, out=sys.stdout):
    runs = [(d, r) for d, r in find_runs(root) if status is None or r.get("status") == status]
    if not runs:
        print(f"no runs under {root}" + (f" with status {status}" if status else ""), file=out)
        return
    runs.sort(key=lambda dr: _parse_time(dr[1].get("updated")), reverse=True)
    rows = [["NAME", "SIGNATURE", "KIND", "STATUS", "PROGRESS", "BEST", "UPDATED"]]
    rows += [_row(d, r) for d, r in runs]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)


def resolve_run(spec, root):
    """A run directory from a path, or a name or signature prefix (else a name part) under root."""
    if os.path.isfile(os.path.join(spec, RECORD)):
        return spec
    if os.path.isdir(spec) and os.sep in spec:
        raise UserError(f"{spec} holds no {RECORD}: not a run directory")
    if not os.path.isdir(root):
        raise UserError(f"no run {spec!r}: not a run directory, and no runs root {root!r} "
                        "(use --root)")
    found = [(d, r.get("name") or os.path.basename(d), r.get("signature") or "")
             for d, r in find_runs(root)]
    hits = [d for d, name, sig in found if name.startswith(spec) or sig.startswith(spec)]
    if not hits:  # `atto` for convnextv2_atto-1234567890
        hits = [d for d, name, _ in found if spec in name]
    if not hits:
        raise UserError(f"no run matches {spec!r} under {root} (python -m util.runs {root} lists them)")
    if len(hits) > 1:
        raise UserError(f"{spec!r} matches {len(hits)} runs ({', '.join(sorted(hits)[:5])}); "
                        "give more of the name or signature")
    return hits[0]


def show_run(spec, root, out=sys.stdout):
    run_dir = resolve_run(spec, root)
    print(f"# {os.path.join(run_dir, RECORD)}", file=out)
    print(json.dumps(RunRecord.load(run_dir), indent=2, sort_keys=True), file=out)
    cfg = os.path.join(run_dir, CONFIG)
    if os.path.isfile(cfg):
        print(f"\n# {cfg}", file=out)
        with open(cfg, encoding="utf-8") as f:
            print(f.read().rstrip("\n"), file=out)
    else:
        print(f"\n# no {CONFIG} in {run_dir}", file=out)


def quiet_on_broken_pipe(fn):
    """A listing piped into `head` ends quietly when the reader stops reading: no BrokenPipeError
    traceback (nor one at exit, when Python flushes stdout); the exit status is 1, the output
    having been cut off (the recipe of Python's signal docs)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            out = fn(*args, **kwargs)
            sys.stdout.flush()  # a broken pipe shows here, not at interpreter exit
            return out
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush at exit
            sys.exit(1)
    return wrapper


@quiet_on_broken_pipe
@user_errors()
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["show"]:
        p = argparse.ArgumentParser(prog="python -m util.runs show",
                                    description="Print a run's run.json and config.yaml.")
        p.add_argument("run", help="run directory, or a name or signature prefix")
        p.add_argument("--root", default=DEFAULT_ROOT, help="where to search for the run")
        a = p.parse_args(argv[1:])
        show_run(a.run, a.root)
        return
    p = argparse.ArgumentParser(prog="python -m util.runs",
                                description="List runs (newest update first). "
                                            "`python -m util.runs show RUN` prints one.")
    p.add_argument("root", nargs="?", default=DEFAULT_ROOT, help="folder holding runs")
    p.add_argument("--status", choices=STATUSES, help="only runs with this status")
    a = p.parse_args(argv)
    list_runs(a.root, a.status)


if __name__ == "__main__":
    main()
