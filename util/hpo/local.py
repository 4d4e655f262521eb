"""`main_<kind>.py --optimize_config FILE`: the study's trials one after another in this
process (or this torchrun group), each trained on every rank of it."""
from util import distributed as du
from util.errors import user_errors
from util.hpo.driver import run_study
from util.hpo.spec import prepare
from util.hpo.study import study_dir
from util.hpo.summary import summarize
from util.hpo.trial import Trial


@user_errors()
def optimize(args, kind):
    """`main_<kind>.py --optimize_config FILE`: run the study's trials here, one after another."""
    spec = prepare(args, kind)
    sdir = study_dir(args, spec)

    def train_here(job, study, storage, stop):  # on every rank of this process group
        return Trial(kind, args, spec, job, sdir, args.storage)(storage)  # the driver's open storage
    du.keep_process_group(True)  # main() would tear the group down after each trial
    du.init_distributed(args)
    try:
        study, how = run_study(args, kind, spec, train_here)
        if du.is_main_process() and how == "done":
            summarize(study, spec, sdir)
    finally:
        du.keep_process_group(False)
        du.cleanup()
    return 0
