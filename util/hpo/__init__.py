"""Hyperparameter search with Optuna: every trial is an ordinary run (docs/search.md).

`main_*.py --optimize_config search.yaml` runs `optimize(args, kind)`: the search file is checked
whole before any trial starts, then trials run one after another in this process (or this
torchrun group) until the study holds `trials` finished ones. Each trial is `main(args)` with
the sampled flags, so it gets its own run directory named by its signature; a trial landing on
a completed run reuses its result.

Who does what: the *driver* (`run_study`) picks the next trial under the study lock and hands
it to a launcher; the process that trains the trial (rank 0) reports the metric after each
epoch, asks the pruner, broadcasts the decision so every rank stops together, and tells Optuna
the result (`Trial`). One module per job:

- spec.py      the search file, and the launch flags a study refuses
- samplers.py  the Optuna sampler and pruner it names
- study.py     storage, the study, lock files: who owns which trial
- trial.py     one trial: its flags, its per-epoch report and pruning, telling Optuna
- driver.py    the driver loop (threads for parallel trial jobs)
- summary.py   TensorBoard HParams, the counts, best.yaml
- local.py     trials here (`optimize`)
- slurm.py     one Slurm job per trial (`optimize_slurm`; imported by submitit_*.py only, so a
               local search does not load the launcher)
"""
from util.hpo.local import optimize  # noqa: F401 (API)
from util.hpo.samplers import make_sampler  # noqa: F401 (API)
from util.hpo.spec import Param, SearchSpec, prepare  # noqa: F401 (API)
from util.hpo.study import open_storage, open_study, study_dir  # noqa: F401 (API)
