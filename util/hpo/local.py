"""`main_<kind>.py --optimize_config FILE`: the study's trials one after another in this
process (or this torchrun group), each trained on every rank of it."""
from util import distributed as du
from util.errors import exit_on_user_error
from util.hpo.driver import run_study
from util.hpo.spec import prepare
from util.hpo.study import study_dir
from util.hpo.summary import summarize
from util.hpo.trial import TrialTask


def local_launcher(kind, args, spec, sdir):
    """Launcher factory: train each trial here, on every rank of this process group."""
    def make(study, storage, stop=None):
        def launch(job):
            return TrialTask(kind, args, spec, job, sdir, args.storage)(storage)  # the open storage
        return launch
    return make


@exit_on_user_error
def optimize(args, kind):
    """`main_<kind>.py --optimize_config FILE`: run the study's trials here, one after another."""
    spec = prepare(args, kind)
    sdir = study_dir(args, spec)
    du.keep_process_group(True)  # main() would tear the group down after each trial
    du.init_distributed(args)
    try:
        study, how = run_study(args, kind, spec, local_launcher(kind, args, spec, sdir))
        if du.is_main_process() and how == "done":
            summarize(study, spec, sdir)
    finally:
        du.keep_process_group(False)
        du.cleanup()
    return 0
