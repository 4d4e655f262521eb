"""The search file of a hyperparameter search (docs/search.md): read with yaml.safe_load and
checked whole before any trial starts (unknown keys, flags the script does not have, types
that do not match the flag, empty or reversed ranges, unknown Optuna classes, values the script
itself refuses); every mistake is a one-line UserError. Also builds the sampler and pruner."""
import copy
import dataclasses
import inspect
import math
import re

from util.errors import UserError

SPEC_KEYS = ("study_name", "trials", "seed", "metric", "direction", "sampler", "pruner", "search_space")
REQUIRED = ("study_name", "trials", "metric", "direction", "search_space")
PARAM_KEYS = {"int": {"type", "min", "max", "step", "log"}, "float": {"type", "min", "max", "step", "log"},
              "categorical": {"type", "choices"}}
# Flags a trial must not set: they pick where a run lives or how this launch behaves.
NOT_SEARCHABLE = {"config", "optimize_config", "storage", "output_dir", "log_dir", "resume", "force",
                  "eval", "preflight", "start_epoch", "runs_root", "device"}


def known_metrics(kind, args):
    """Keys of the per-epoch log (log.txt) a study can optimize, for these settings."""
    out = {"train_loss", "train_lr", "train_grad_norm"}
    if kind == "finetune" and not args.disable_eval:
        out |= {"test_loss", "test_acc1", "test_acc5"}
        if args.model_ema and args.model_ema_eval:
            out |= {"test_loss_ema", "test_acc1_ema", "test_acc5_ema"}
    return out


@dataclasses.dataclass
class Param:
    flag: str
    type: str
    low: float = None
    high: float = None
    step: float = None
    log: bool = False
    choices: list = None
    values: dict = None  # categorical: choice -> the flag's value (through the flag's own type)

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
        if self.type == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        if self.type == "float":
            return FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        return CategoricalDistribution(self.choices)

    def value(self, v):
        """The flag's value for a sampled one."""
        if self.type == "categorical":
            return self.values[_choice_key(v)]
        # 12 significant digits: a stepped float such as 0.4 + 2 * 0.1 is the 0.6 a user would type
        return int(v) if self.type == "int" else float(f"{float(v):.12g}")


def _choice_key(v):
    return (type(v).__name__, v)


@dataclasses.dataclass
class SearchSpec:
    path: str
    study_name: str
    trials: int
    metric: str
    direction: str
    params: dict
    seed: int = None
    sampler: tuple = ("TPESampler", {})
    pruner: tuple = ("MedianPruner", {})

    def distributions(self):
        return {flag: p.distribution() for flag, p in self.params.items()}

    def better(self, a, b):
        return a > b if self.direction == "maximize" else a < b


def _number(v, where, integer=False):
    """YAML reads `1e-3` (no dot) as text: take numbers written either way."""
    if isinstance(v, bool):
        raise UserError(f"{where}: expects a number, got {v!r}")
    if integer:
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise UserError(f"{where}: expects a whole number, got {v!r}")
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expects a number, got {v!r}") from None
    if not math.isfinite(out):
        raise UserError(f"{where}: expects a finite number, got {v!r}")
    return out


def _class_spec(value, where, default):
    """`sampler:` / `pruner:` as {name, kwargs} (or just the name)."""
    if value is None:
        return default
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise UserError(f"{where}: write {{name: ClassName, kwargs: {{...}}}}, got {value!r}")
    unknown = sorted(set(value) - {"name", "kwargs"})
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (keys: name, kwargs)")
    name, kwargs = value.get("name"), value.get("kwargs") or {}
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: name must be an Optuna class name, e.g. {default[0]}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise UserError(f"{where}.kwargs: must be a mapping of argument names to values")
    return name, dict(kwargs)


def _optuna_class(module, base, name, where):
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        names = sorted(n for n in dir(module) if inspect.isclass(getattr(module, n))
                       and issubclass(getattr(module, n), base) and not n.startswith("Base"))
        raise UserError(f"{where}: unknown {module.__name__} class {name!r}; choose one of {', '.join(names)}")
    return cls


# Samplers that draw afresh from their seed and the study's history at each trial: seeded with
# seed + trial number, a trial's draw does not depend on which worker makes it and two workers
# never draw alike. The others (GridSampler's shuffled grid, QMCSampler's sequence, ...) need
# one seed for the whole study.
RESEEDED_PER_TRIAL = ("TPESampler", "RandomSampler")


def make_sampler(spec, trial_number=0):
    """The spec's sampler; `seed` goes to it unless its kwargs name one (see RESEEDED_PER_TRIAL)."""
    import optuna
    name, kwargs = spec.sampler
    cls = _optuna_class(optuna.samplers, optuna.samplers.BaseSampler, name, f"{spec.path}: sampler")
    kwargs = dict(kwargs)
    accepts = inspect.signature(cls).parameters
    if spec.seed is not None and "seed" in accepts and "seed" not in kwargs:
        kwargs["seed"] = spec.seed + (trial_number if name in RESEEDED_PER_TRIAL else 0)
    if name == "GridSampler" and "search_space" not in kwargs:
        kwargs["search_space"] = _grid(spec)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{spec.path}: sampler {name}: {e}") from None


def _grid(spec):
    grid = {}
    for flag, p in spec.params.items():
        if p.type == "categorical":
            grid[flag] = list(p.choices)
        elif p.type == "int" and not p.log:
            grid[flag] = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
        elif p.type == "float" and p.step and not p.log:
            n = int(round((p.high - p.low) / p.step))
            grid[flag] = [p.low + i * p.step for i in range(n + 1)]
        else:
            raise UserError(f"{spec.path}: GridSampler needs a finite grid: give search_space.{flag} "
                            "choices or a step (or sampler kwargs search_space)")
    return grid


def make_pruner(spec):
    import optuna
    name, kwargs = spec.pruner
    cls = _optuna_class(optuna.pruners, optuna.pruners.BasePruner, name, f"{spec.path}: pruner")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{spec.path}: pruner {name}: {e}") from None


def _dest_actions(parser):
    from util.config import _dest_actions as dest_actions
    return dest_actions(parser)


def _parse_param(path, flag, raw, actions):
    from util.config import _convert
    where = f"{path}: search_space.{flag}"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: write {{type: int|float|categorical, ...}}, got {raw!r}")
    kind = raw.get("type")
    if kind not in PARAM_KEYS:
        raise UserError(f"{where}: type must be int, float or categorical, got {kind!r}")
    unknown = sorted(set(raw) - PARAM_KEYS[kind])
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} for type {kind} "
                        f"(keys: {', '.join(sorted(PARAM_KEYS[kind]))})")
    acts = actions[flag]
    action = next((a for a in acts if a.nargs != 0), acts[0])
    if action.nargs not in (None, "?"):
        raise UserError(f"{where}: --{flag} takes several values; only single-valued flags can be searched")
    flag_type = action.type
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: choices must be a non-empty list")
        values = {}
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise UserError(f"{where}: choice {c!r} is not a single value")
            if _choice_key(c) in values:
                raise UserError(f"{where}: choice {c!r} is given twice")
            values[_choice_key(c)] = _convert(action, c, f"{where} choice {c!r}")
        return Param(flag, kind, choices=list(choices), values=values)
    if flag_type not in (int, float) or action.choices is not None:
        raise UserError(f"{where}: --{flag} is not a number flag; use type: categorical with choices")
    if (flag_type is int) != (kind == "int"):
        raise UserError(f"{where}: --{flag} takes {'a whole number' if flag_type is int else 'a float'}; "
                        f"use type: {flag_type.__name__}")
    for key in ("min", "max"):
        if key not in raw:
            raise UserError(f"{where}: {key} is missing")
    integer = kind == "int"
    low = _number(raw["min"], f"{where}.min", integer)
    high = _number(raw["max"], f"{where}.max", integer)
    step = None if raw.get("step") is None else _number(raw["step"], f"{where}.step", integer)
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: expects true or false, got {log!r}")
    if low > high:
        raise UserError(f"{where}: min {low} is above max {high}")
    if step is not None and step <= 0:
        raise UserError(f"{where}.step: must be > 0, got {step}")
    if log and low <= 0:
        raise UserError(f"{where}: log: true needs min > 0, got {low}")
    if log and step is not None and not (integer and step == 1):
        raise UserError(f"{where}: log and step cannot be used together")
    return Param(flag, kind, low=low, high=high, step=step, log=log)


def load_spec(path, parser, kind, args):
    """Read and check the whole search file (and the flags it searches) before any trial:
    every mistake is a one-line UserError. `_check_bounds` then asks the script itself."""
    from util.config import load_yaml
    from util.runs import OUTCOME_EXCLUDED
    data = load_yaml(path)
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        import difflib
        close = difflib.get_close_matches(str(unknown[0]), SPEC_KEYS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"keys: {', '.join(SPEC_KEYS)}"
        raise UserError(f"{path}: unknown key {unknown[0]!r} ({hint})")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise UserError(f"{path}: {missing[0]} is missing (needed: {', '.join(REQUIRED)})")
    name = data["study_name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"{path}: study_name must be a folder name (letters, digits, . _ -), got {name!r}")
    trials = _number(data["trials"], f"{path}: trials", integer=True)
    if trials < 1:
        raise UserError(f"{path}: trials must be >= 1, got {trials}")
    seed = data.get("seed")
    if seed is not None:
        seed = _number(seed, f"{path}: seed", integer=True)
    direction = data["direction"]
    if direction not in ("maximize", "minimize"):
        raise UserError(f"{path}: direction must be maximize or minimize, got {direction!r}")
    metric = data["metric"]
    known = known_metrics(kind, args)
    if metric not in known:
        why = " (evaluation is off: --disable_eval)" if kind == "finetune" and args.disable_eval \
            and isinstance(metric, str) and metric.startswith("test_") else ""
        raise UserError(f"{path}: metric {metric!r} is not in the per-epoch log{why}; "
                        f"choose one of {', '.join(sorted(known))}")
    space = data["search_space"]
    if not isinstance(space, dict) or not space:
        raise UserError(f"{path}: search_space must map flag names to {{type, ...}}")
    actions = _dest_actions(parser)
    params = {}
    for key, raw in space.items():
        flag = key.replace("-", "_") if isinstance(key, str) else key
        if flag not in actions:
            import difflib
            close = difflib.get_close_matches(str(flag), list(actions), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see --help for the flags"
            raise UserError(f"{path}: search_space: {key!r} is not a flag of this script ({hint})")
        if flag in NOT_SEARCHABLE or flag in OUTCOME_EXCLUDED:
            raise UserError(f"{path}: search_space: {flag} does not change what a run computes "
                            "(it is not part of the run signature); search flags that do")
        params[flag] = _parse_param(path, flag, raw, actions)
    if "blr" in params and getattr(args, "lr", None) is not None:
        raise UserError(f"{path}: search_space.blr has no effect while --lr {args.lr} is set; drop --lr")
    spec = SearchSpec(path=path, study_name=name, trials=trials, metric=metric, direction=direction,
                      params=params, seed=seed,
                      sampler=_class_spec(data.get("sampler"), f"{path}: sampler", ("TPESampler", {})),
                      pruner=_class_spec(data.get("pruner"), f"{path}: pruner", ("MedianPruner", {})))
    make_sampler(spec)
    make_pruner(spec)
    if (metric.endswith("loss") and direction == "maximize") or ("acc" in metric and direction == "minimize"):
        print(f"warning: {path}: direction {direction} for metric {metric}: is that what you mean?")
    return spec


def _check_bounds(spec, args, validate_args):
    """The script's own checks on each end of each range (and each choice)."""
    for flag, p in spec.params.items():
        ends = [p.value(c) for c in p.choices] if p.type == "categorical" else [p.value(p.low), p.value(p.high)]
        for v in ends:
            trial = copy.copy(args)
            setattr(trial, flag, v)
            try:
                validate_args(trial)
            except UserError as e:
                raise UserError(f"{spec.path}: search_space.{flag} = {v!r} is refused by the script: {e}") from None

