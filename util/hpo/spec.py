"""The search file of a hyperparameter search (docs/search.md): read with yaml.safe_load and
checked whole before any trial starts (unknown keys, flags the script does not have, types
that do not match the flag, empty or reversed ranges, unknown Optuna classes, values the script
itself refuses); every mistake is a one-line UserError. `prepare` also refuses the launch flags
that name one run (ONE_RUN_FLAGS).
"""
import copy
import dataclasses
import difflib
import importlib
import math
import re

from util import flags
from util.errors import UserError
from util.hpo.samplers import class_spec, make_pruner, make_sampler

MODULES = {"finetune": "main_finetune", "pretrain": "main_pretrain"}  # kind -> main script
SPEC_KEYS = ("study_name", "trials", "seed", "metric", "direction", "sampler", "pruner", "search_space")
REQUIRED = ("study_name", "trials", "metric", "direction", "search_space")
PARAM_KEYS = {"int": {"type", "min", "max", "step", "log"}, "float": {"type", "min", "max", "step", "log"},
              "categorical": {"type", "choices"}}
# Flags a search space may not name (they do not change what a run computes), and the flags a
# study's own command line may not set (they name one run), with why: both from the flag table.
NOT_SEARCHABLE = flags.not_outcome()
ONE_RUN_FLAGS = flags.study_refusals()


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


def _parse_param(where, flag, raw, action):
    """A search_space entry as a Param, checked against the flag it searches."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: write {{type: int|float|categorical, ...}}, got {raw!r}")
    kind = raw.get("type")
    if kind not in PARAM_KEYS:
        raise UserError(f"{where}: type must be int, float or categorical, got {kind!r}")
    unknown = sorted(set(raw) - PARAM_KEYS[kind])
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} for type {kind} "
                        f"(keys: {', '.join(sorted(PARAM_KEYS[kind]))})")
    if action.nargs not in (None, "?"):
        raise UserError(f"{where}: --{flag} takes several values; only single-valued flags can be searched")
    if kind == "categorical":
        from util.config import convert_value
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: choices must be a non-empty list")
        values = {}
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise UserError(f"{where}: choice {c!r} is not a single value")
            if _choice_key(c) in values:
                raise UserError(f"{where}: choice {c!r} is given twice")
            values[_choice_key(c)] = convert_value(action, c, f"{where} choice {c!r}")
        return Param(flag, "categorical", choices=list(choices), values=values)
    flag_type = action.type
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
    every mistake is a one-line UserError. `prepare` then asks the script itself."""
    from util.config import dest_actions, load_yaml
    data = load_yaml(path)
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
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
    known = {"train_loss", "train_lr", "train_grad_norm"}  # the keys of the per-epoch log (log.txt)
    if kind == "finetune" and not args.disable_eval:
        known |= {"test_loss", "test_acc1", "test_acc5"}
        if args.model_ema and args.model_ema_eval:
            known |= {"test_loss_ema", "test_acc1_ema", "test_acc5_ema"}
    if metric not in known:
        why = " (evaluation is off: --disable_eval)" if kind == "finetune" and args.disable_eval \
            and isinstance(metric, str) and metric.startswith("test_") else ""
        raise UserError(f"{path}: metric {metric!r} is not in the per-epoch log{why}; "
                        f"choose one of {', '.join(sorted(known))}")
    space = data["search_space"]
    if not isinstance(space, dict) or not space:
        raise UserError(f"{path}: search_space must map flag names to {{type, ...}}")
    actions = dest_actions(parser)
    params = {}  # each key a flag of the script that changes what a run computes
    for key, raw in space.items():
        flag = key.replace("-", "_") if isinstance(key, str) else key
        if flag not in actions:
            close = difflib.get_close_matches(str(flag), list(actions), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see --help for the flags"
            raise UserError(f"{path}: search_space: {key!r} is not a flag of this script ({hint})")
        if flag in NOT_SEARCHABLE:
            raise UserError(f"{path}: search_space: {flag} does not change what a run computes "
                            "(it is not part of the run signature); search flags that do")
        action = next((a for a in actions[flag] if a.nargs != 0), actions[flag][0])
        params[flag] = _parse_param(f"{path}: search_space.{flag}", flag, raw, action)
    if "blr" in params and args.lr is not None:
        raise UserError(f"{path}: search_space.blr has no effect while --lr {args.lr} is set; drop --lr")
    spec = SearchSpec(path=path, study_name=name, trials=trials, metric=metric, direction=direction,
                      params=params, seed=seed,
                      sampler=class_spec(data.get("sampler"), f"{path}: sampler", ("TPESampler", {})),
                      pruner=class_spec(data.get("pruner"), f"{path}: pruner", ("MedianPruner", {})))
    make_sampler(spec)
    make_pruner(spec)
    if (metric.endswith("loss") and direction == "maximize") or ("acc" in metric and direction == "minimize"):
        print(f"warning: {path}: direction {direction} for metric {metric}: is that what you mean?")
    return spec


def prepare(args, kind):
    """Everything checked before any trial: the launch's flags, the whole search file, then the
    script's own checks on each end of each range (and each choice)."""
    module = importlib.import_module(MODULES[kind])
    if not args.optimize_config:
        raise UserError("--storage is for a hyperparameter search: give --optimize_config search.yaml")
    for flag, msg in ONE_RUN_FLAGS.items():
        if getattr(args, flag):
            raise UserError(msg)
    spec = load_spec(args.optimize_config, module.get_args_parser(), kind, args)
    module.validate_args(args)
    for flag, p in spec.params.items():
        ends = [p.value(c) for c in p.choices] if p.type == "categorical" else [p.value(p.low), p.value(p.high)]
        for v in ends:
            trial = copy.copy(args)
            setattr(trial, flag, v)
            try:
                module.validate_args(trial)
            except UserError as e:
                raise UserError(f"{spec.path}: search_space.{flag} = {v!r} is refused by the script: {e}") from None
    return spec
