"""The Optuna sampler and pruner a search file names (`sampler:` / `pruner:`), built and
seeded (a class by its name in optuna.samplers / optuna.pruners, or by its dotted path); an
unknown class or a bad argument is one line."""
import importlib
import inspect

from util.errors import UserError

# Samplers that draw afresh from their seed and the study's history at each trial: seeded with
# seed + trial number, a trial's draw does not depend on which worker makes it and two workers
# never draw alike. The others (GridSampler's shuffled grid, QMCSampler's sequence, ...) need
# one seed for the whole study.
RESEEDED_PER_TRIAL = ("TPESampler", "RandomSampler")


def class_spec(value, where, default):
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
    """The class `name` names: a class of `module` (optuna.samplers, optuna.pruners) by its name, or
    any importable class by its dotted path (`optuna.samplers.TPESampler`, `mypkg.MySampler`)."""
    owner, _, short = name.rpartition(".")
    if owner:
        try:
            found = importlib.import_module(owner)
        except ImportError as e:
            raise UserError(f"{where}: cannot import {owner!r} for {name!r} ({e}); write a class of "
                            f"{module.__name__} by its name, e.g. {_names(module, base)[0]}") from None
    else:
        found = module
    cls = getattr(found, short, None)
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        what = f"unknown {module.__name__} class {short!r}" if found is module else \
            f"{name!r} is no {module.__name__} class (a subclass of {base.__name__})"
        raise UserError(f"{where}: {what}; choose one of {', '.join(_names(module, base))} (by name, "
                        f"or by dotted path: {module.__name__}.<name>)")
    return cls


def _names(module, base):
    return sorted(n for n in dir(module) if inspect.isclass(getattr(module, n))
                  and issubclass(getattr(module, n), base) and not n.startswith("Base"))


def make_sampler(spec, trial_number=0):
    """The spec's sampler; `seed` goes to it unless its kwargs name one (see RESEEDED_PER_TRIAL)."""
    import optuna
    name, kwargs = spec.sampler
    cls = _optuna_class(optuna.samplers, optuna.samplers.BaseSampler, name, f"{spec.path}: sampler")
    kwargs = dict(kwargs)
    accepts = inspect.signature(cls).parameters
    reseeded = cls in tuple(getattr(optuna.samplers, n) for n in RESEEDED_PER_TRIAL)
    if spec.seed is not None and "seed" in accepts and "seed" not in kwargs:
        kwargs["seed"] = spec.seed + (trial_number if reseeded else 0)
    if cls is optuna.samplers.GridSampler and "search_space" not in kwargs:  # the grid of the search space
        grid = kwargs["search_space"] = {}
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
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{spec.path}: sampler {name}: {e}") from None


def make_pruner(spec):
    import optuna
    name, kwargs = spec.pruner
    cls = _optuna_class(optuna.pruners, optuna.pruners.BasePruner, name, f"{spec.path}: pruner")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{spec.path}: pruner {name}: {e}") from None
