"""What a study shows: one TensorBoard HParams session per finished trial, the counts and the
best trial at the end, and best.yaml (the best run's config.yaml)."""
import json
import math
import os
import sys

STATES = ("COMPLETE", "PRUNED", "FAIL")


def fmt_params(params):
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def write_hparams(sdir, spec, number, params, state, value):
    """One TensorBoard HParams session per finished trial: <study>/tensorboard/trial-NNNN."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams
    hp, discrete = {"trial_state": state}, {"trial_state": list(STATES)}
    for flag, v in params.items():
        p = spec.params.get(flag)
        if p is not None and p.type == "categorical":
            hp[flag], discrete[flag] = str(v), [str(c) for c in p.choices]
        else:
            hp[flag] = v
    metrics = {f"hparams/{spec.metric}": float(value)} if value is not None and math.isfinite(value) else {}
    exp, ssi, sei = hparams(hp, metrics, hparam_domain_discrete=discrete)
    with SummaryWriter(log_dir=os.path.join(sdir, "tensorboard", f"trial-{number:04d}")) as w:
        for summary in (exp, ssi, sei):
            w.file_writer.add_summary(summary)
        for k, v in metrics.items():
            w.add_scalar(k, v)


def summarize(study, spec, sdir, out=None):
    """Print the counts and the best trial; write best.yaml (the best run's config.yaml)."""
    out = out or sys.stdout
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name == s for t in trials) for s in STATES}
    running = sum(t.state == TrialState.RUNNING for t in trials)
    line = ", ".join(f"{n} {w}" for w, n in zip(("complete", "pruned", "failed"), counts.values()))
    print(f"[study {spec.study_name}] {sum(counts.values())} finished trials ({line})"
          + (f", {running} still running elsewhere" if running else "") + f"; study folder {sdir}", file=out)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        print(f"[study {spec.study_name}] no completed trial yet: no best.yaml", file=out)
        return None
    best = study.best_trial
    run_dir = best.user_attrs.get("run_dir")
    print(f"[study {spec.study_name}] best trial {best.number}: {spec.metric} {best.value:.6g}; "
          f"params {fmt_params(best.params)}; run {run_dir}", file=out)
    src = os.path.join(run_dir or "", "config.yaml")
    if os.path.isfile(src):
        from models.atomic import atomic_write_text
        with open(src, encoding="utf-8") as f:
            body = f.read()
        header = (f"# Best trial {best.number} of study {spec.study_name}: {spec.metric} {best.value:.6g} "
                  f"({spec.direction}); run {run_dir}\n# params: {json.dumps(best.params)}\n")
        atomic_write_text(os.path.join(sdir, "best.yaml"), header + body)
        print(f"[study {spec.study_name}] wrote {os.path.join(sdir, 'best.yaml')} (use it as --config)", file=out)
    return best
