"""Experiment trackers: Weights & Biases (--log_wandb) and MLflow (--mlflow_uri) mirror a run.

The run directory stays the unit of truth; a tracker run is a view of it, keyed by ids kept in
run.json (`trackers`), so a run that is preempted, requeued, stopped and relaunched or restarted
by torchrun continues the same W&B and MLflow run. Only rank 0 talks to them. wandb and mlflow
are imported only when a run asks for them.

    tracking = Tracking(args, kind, ctx, record, study, updates_per_epoch, resumed_at)
    record.start(..., **tracking.ids)                                 # the ids, for run.json
    ...
    tracking.finish(record.data["status"], best)                      # as run.json says it ended

`Tracking` is what train_one_epoch (`scalars` at the global optimizer step), the Task's `show`
(`image`) and the Trainer (`epoch`, `finish`) log through: TensorBoard as before, plus each
tracker. Each tracker (`WandbRun`, `MlflowRun`) has the same four calls: `ids` (for run.json),
`log(values, step)`, `image(tag, hwc_uint8, step)`, `finish(status, summary, checkpoints)`.
"""
import os
import time

from util import distributed as du
from util.config import config_dict
from util.console import info
from util.errors import UserError, first_line
from util.logger import TensorBoard
from util.runs import STATUSES


def _why(e):
    """An exception as one short line: a tracker's own messages run to paragraphs."""
    return f"{type(e).__name__}: {first_line(e)[:300]}"


class WandbRun:
    """A W&B run: resumed by the id run.json keeps when the project and entity are the same, else
    a new one. Its files go into the run directory (<run_dir>/wandb/, unless WANDB_DIR says
    otherwise), so an offline run is synced from there (`wandb sync <run_dir>/wandb/offline-run-*`)."""
    key = "wandb"  # its entry in run.json's `trackers`

    def __init__(self, args, kind, run_dir, settings, known, study):
        import wandb
        self.wandb = wandb
        where = {"project": args.wandb_project, "entity": args.wandb_entity}
        same = known if known and all(known.get(k) == v for k, v in where.items()) else {}
        try:
            self.run = wandb.init(
                **where, id=same.get("id"), resume="allow", name=os.path.basename(run_dir), job_type=kind,
                group=study["name"] if study else None, tags=args.wandb_tags,
                dir=os.environ.get("WANDB_DIR") or run_dir)
        except Exception as e:  # no login, refused by the server, unusable settings: wandb's own errors
            raise UserError(f"--log_wandb: W&B could not start ({_why(e)}); run `wandb login`, or set "
                            "WANDB_MODE=offline to log to local files and `wandb sync` them later") from None
        # a resumed run's settings may differ in what does not change the result (e.g. --print_freq)
        self.run.config.update(settings, allow_val_change=True)
        self.run.define_metric("epoch/*", step_metric="epoch")  # epoch charts against the epoch
        self.ids = {"id": self.run.id, **where}

    def log(self, values, step):
        self.run.log(values, step=step)

    def image(self, tag, hwc, step):
        self.run.log({tag: self.wandb.Image(hwc)}, step=step)

    def finish(self, status, summary, checkpoints):
        self.run.summary.update(summary)
        if status == "pruned":
            self.run.tags = (*self.run.tags, "pruned")
        if checkpoints:
            art = self.wandb.Artifact(f"{self.run.id}-checkpoints", type="model")
            for path in checkpoints:
                art.add_file(path)
            self.run.log_artifact(art)
        if status in ("preempted", "interrupted"):
            self.run.mark_preempting()  # W&B shows the run preempted until it comes back
        self.run.finish(exit_code=1 if status == "failed" else 0)


class MlflowRun:
    """An MLflow run, through MlflowClient (no fluent API: its active run is process-wide state):
    resumed by the run id run.json keeps when the tracking URI is the same, else a new run in
    --mlflow_experiment. Settings are params (logged once: MLflow refuses a changed param, and
    config.yaml is the truth), the study a tag."""

    key = "mlflow"
    # run.json's status -> MLflow's; a run that stopped to resume (preempted, interrupted) is KILLED
    # until a later launch sets it RUNNING again
    STATUS = {"completed": "FINISHED", "failed": "FAILED", "preempted": "KILLED", "pruned": "KILLED",
              "interrupted": "KILLED"}

    def __init__(self, args, kind, run_dir, settings, known, study):
        from mlflow import MlflowClient
        from mlflow.entities import Param
        uri = args.mlflow_uri
        try:
            self.client = client = MlflowClient(tracking_uri=uri)
            if known and known.get("uri") == uri:
                self.run_id = known["run_id"]
                client.update_run(self.run_id, status="RUNNING")
            else:
                tags = {"kind": kind, "run_dir": run_dir, "signature": settings.get("signature", "")}
                if study:
                    tags.update(study=study["name"], study_trial=str(study["trial"]))
                run = client.create_run(self._experiment(args.mlflow_experiment, uri), tags=tags,
                                        run_name=os.path.basename(run_dir))
                self.run_id = run.info.run_id
                params = [Param(k, str(v)[:6000]) for k, v in sorted(settings.items())]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
                    client.log_batch(self.run_id, params=params[i:i + 100])
        except Exception as e:  # MlflowException (a bad URI, the refused file store), a database error
            raise UserError(f"--mlflow_uri {uri}: MLflow could not start ({_why(e)}); give a store MLflow "
                            "can open, e.g. sqlite:///mlflow.db or http://host:5000") from None
        self.ids = {"run_id": self.run_id, "uri": uri}

    def _experiment(self, name, uri):
        """The experiment's id, made when missing. A local SQLite store keeps the artifacts of a new
        experiment (images, checkpoints) beside the database, not in the folder each job starts in
        (MLflow's ./mlruns)."""
        from mlflow.exceptions import MlflowException
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        where = None
        if uri.startswith("sqlite:///"):
            where = os.path.join(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])), "mlartifacts")
        try:
            return self.client.create_experiment(name, artifact_location=where)
        except MlflowException:  # another trial made it at the same time
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, values, step):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def image(self, tag, hwc, step):
        # an MLflow key takes no parentheses: "reconstruction (original / ...)" is "reconstruction"
        self.client.log_image(self.run_id, hwc, key=tag.split(" (")[0], step=step)

    def finish(self, status, summary, checkpoints):
        best = summary.get("best_value")
        if best is not None:
            self.client.log_metric(self.run_id, f"best/{summary['best_name']}", best)
        for k, v in summary.items():
            self.client.set_tag(self.run_id, k, str(v))
        for path in checkpoints:
            self.client.log_artifact(self.run_id, path, "checkpoints")
        self.client.set_terminated(self.run_id, status=self.STATUS[status])


def start_trackers(args, kind, ctx, record, study=None):
    """The trackers the flags ask for, started on rank 0 (resumed with the ids in `record`'s
    run.json), and the run.json fields naming them ({"trackers": ...}, or {}); ([], {}) elsewhere.
    They record the settings of config.yaml, the signature and the run directory (of the
    RunContext `ctx`). A tracker that cannot start stops every rank with the same UserError,
    before the first step. `study`: the search's {"name", "trial", "params", "dir"} or None."""
    runs, error, run_dir = [], None, ctx.run_dir
    if du.is_main_process() and (args.log_wandb or args.mlflow_uri):
        known = record.data.get("trackers") or {}
        settings = {**config_dict(ctx.settings(args)), "signature": record.signature, "run_dir": run_dir}
        try:
            if args.log_wandb:
                runs.append(WandbRun(args, kind, run_dir, settings, known.get("wandb"), study))
            if args.mlflow_uri:
                runs.append(MlflowRun(args, kind, run_dir, settings, known.get("mlflow"), study))
        except UserError as e:
            error = e
            for r in runs:
                r.finish("failed", {}, [])
    error = du.broadcast_object(error) if args.log_wandb or args.mlflow_uri else None
    if error is not None:
        raise error
    for r in runs:
        info(f"tracking in {r.key}: {', '.join(f'{k} {v}' for k, v in r.ids.items() if v)}")
    return runs, {"trackers": {**known, **{r.key: r.ids for r in runs}}} if runs else {}


class Tracking:
    """TensorBoard and the trackers, as one logger (rank 0 logs; elsewhere both are empty).

    Trackers log against the global optimizer step: train scalars at the step of their log line,
    an epoch's metrics and images at the epoch's last step (TensorBoard keeps its epoch axis).
    Every key gets each step at most once:
    - within a launch, a stream (train/, epoch/, an image) logs only steps past its last one: with
      --update_freq above --print_freq, log lines inside one update share its step, and the first
      (the update's own) is kept;
    - across launches, only steps past `resumed_at`, the optimizer step the run resumed from. A
      stop by signal (preemption, requeue, scancel, torchrun's restart) saves exactly there, so the
      earlier launch logged up to it and nothing after: the resumed run neither repeats a step nor
      leaves one out. W&B refuses a step lower than its last, and an offline W&B run or MLflow
      cannot tell us theirs, so the resume point is the one step every tracker agrees on. (A launch
      killed without a clean stop logged the steps between its last checkpoint and the kill; they
      come again with the same values, exact resume: W&B keeps the first, MLflow shows both.)"""

    def __init__(self, args, kind, ctx, record, study=None, updates_per_epoch=1, resumed_at=-1):
        """Start the trackers the flags ask for (start_trackers; `ids`: their run.json fields) beside
        TensorBoard in ctx.log_dir, which drops what a stopped launch logged past `resumed_at`."""
        self.runs, self.ids = start_trackers(args, kind, ctx, record, study)
        self.tb = TensorBoard(ctx.log_dir, purge_step=resumed_at + 1 if resumed_at >= 0 else None)
        self.upe, self.run_dir, self.upload = updates_per_epoch, ctx.run_dir, args.upload_checkpoints
        self.resumed_at, self.last = resumed_at, {}

    def _new(self, stream, step):
        if step <= self.last.get(stream, self.resumed_at):
            return False
        self.last[stream] = step
        return True

    def _each(self, call, *a):
        """`call` of every tracker. One that fails only warns: a tracker's server that is down must
        not end a run, nor stop rank 0 alone while the others wait for it."""
        for r in self.runs:
            try:
                getattr(r, call)(*a)
            except Exception as e:
                print(f"warning: {type(r).__name__}.{call} failed ({_why(e)})", flush=True)

    def scalars(self, step, prefix="", **values):
        """train_one_epoch's scalars at the global optimizer step `step`."""
        self.tb.scalars(step, prefix=prefix, **values)
        if self.runs and self._new(prefix, step):
            self._each("log", {f"{prefix}{k}": float(v) for k, v in values.items() if v is not None}, step)

    def image(self, tag, img, epoch):
        """A [3, H, W] image in [0, 1] after `epoch` (the pretraining reconstruction grid)."""
        self.tb.image(tag, img, epoch)
        step = (epoch + 1) * self.upe
        if self.runs and self._new(tag, step):
            hwc = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            self._each("image", tag, hwc, step)

    def epoch(self, epoch, log):
        """The epoch's numbers of its log.txt line."""
        numbers = {k: v for k, v in log.items() if isinstance(v, (int, float)) and k != "epoch"}
        self.tb.scalars(epoch, prefix="epoch/", **numbers)
        step = (epoch + 1) * self.upe
        if self.runs and self._new("epoch/", step):
            self._each("log", {"epoch": epoch, **{f"epoch/{k}": float(v) for k, v in numbers.items()}}, step)

    def flush(self):
        self.tb.flush()

    def close(self):
        self.tb.close()

    def finish(self, status, best):
        """End the tracker runs as the run ended (`status` of run.json; "running" when its record could
        not be finished counts as failed): the run directory, the best metric and the paths of the
        best and last checkpoints; with --upload_checkpoints, a completed run's checkpoints too."""
        status = status if status in STATUSES[1:] else "failed"  # STATUSES[0]: running
        run_dir, upload = self.run_dir, self.upload and status == "completed"
        paths = {k: os.path.join(run_dir, f"checkpoint-{k}.pth") for k in ("best", "last")}
        summary = {"status": status, "run_dir": run_dir, "best_name": best.get("name"),
                   "best_value": best.get("value"), "best_epoch": best.get("epoch"),
                   **{f"checkpoint_{k}": p if os.path.isfile(p) else None for k, p in paths.items()}}
        self._each("finish", status, summary, [p for p in paths.values() if upload and os.path.isfile(p)])
