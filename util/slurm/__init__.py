"""Launch main_pretrain.py / main_finetune.py as Slurm jobs (or locally) with submitit.

One code path for both submitit_*.py scripts: they take every flag of their main script plus the
Slurm flags, resolve the run directory *before* submitting (so a requeued or resubmitted job
finds the same run), refuse bad input before anything is queued, and submit a `Job` that
calls the script's own `main(args)`. See docs/slurm.md. One module per job:

- flags.py      the Slurm flags (`launcher_parser`), splitting a launch's flags, their checks
- inputs.py     data and checkpoints checked before queueing
- cli.py        asking scontrol, sinfo, squeue, sacct
- partition.py  does the request fit the partition
- rundir.py     the run directory of a launch, job.json
- executor.py   submitit executor, sbatch settings, the --dry_run batch script, submission
- job.py        the one job wrapper (`Job`) of runs and search trials; preemption hand-off
- wait.py       job states, a job already on a run, waiting, why a job failed
- launch.py     one launch: `check_launch`, then `submit_run`

This package knows nothing of searches: util/hpo/slurm.py uses it to run each trial as a job.
"""
from util.slurm.cli import slurm_state  # noqa: F401 (API)
from util.slurm.executor import make_executor, slurm_parameters, submit  # noqa: F401 (API)
from util.slurm.flags import gpus_per_node, launcher_parser, split_args  # noqa: F401 (API)
from util.slurm.job import Job  # noqa: F401 (API)
from util.slurm.launch import check_launch, submit_run  # noqa: F401 (API)
from util.slurm.partition import check_partition, parse_minutes  # noqa: F401 (API)
from util.slurm.rundir import record_job, resolve_new_run, resolve_run  # noqa: F401 (API)
from util.slurm.wait import FINAL_STATES, active_job, error_line, wait_until_over  # noqa: F401 (API)
