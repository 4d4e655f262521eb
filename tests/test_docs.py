"""Docs that derive from code stay in step with it."""
import os
import re

from util import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_errors_md_table_of_checks_is_the_flag_tables():
    """docs/errors.md shows the flag table's ranges and choices as `flags.markdown()` gives them;
    a check added, removed or changed in util/flags.py without `python scripts/flag_docs.py`
    fails here."""
    with open(os.path.join(REPO, "docs", "errors.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- flag-checks:start -->\n(.*?)<!-- flag-checks:end -->", text, re.S)
    assert m, "docs/errors.md lost its flag-checks markers"
    assert m.group(1) == flags.markdown(), "regenerate it: python scripts/flag_docs.py"


def test_what_the_flag_table_decides_elsewhere_is_written_by_one_command():
    """docs/errors.md's table of checks, docs/runs.md's list of flags added since version 2 and
    the record of outcome defaults follow the flag table: `python scripts/flag_docs.py` writes
    them, and after it nothing is out of date (a flag added without it fails here)."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "flag_docs.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr + "\nrun: python scripts/flag_docs.py"


def test_every_flag_has_help_and_a_known_role():
    for f in flags.TABLE:
        for kind in f.scripts:
            assert f.help_for(kind).strip(), f"--{f.name} has no help text in {kind}"
        assert f.role in (flags.OUTCOME, flags.SETTING, flags.LAUNCH, flags.LAUNCHER), f.name
        assert set(f.scripts) <= set(flags.SCRIPTS) and f.scripts, f.name


def test_help_lists_every_flag_of_the_script():
    for kind in ("finetune", "pretrain"):
        text = flags.build_parser(kind, "x").format_help()
        for f in flags.flags_of(kind):
            assert f"--{f.name}" in text, (kind, f.name)


ENTRY_POINTS = (("main_finetune", "finetune"), ("main_pretrain", "pretrain"),
                ("submitit_finetune", "finetune"), ("submitit_pretrain", "pretrain"))


def _parser(module):
    import importlib
    return importlib.import_module(module).get_args_parser()


def _help_text(module):
    return " ".join(_parser(module).format_help().split())  # argparse wraps at the terminal's width


def test_help_shows_defaults_names_the_script_and_explains_true_false_once():
    """--help of every entry point: its own name in the usage line, each flag with a help text
    and its default in that script, BOOL explained once."""
    from util.config import dest_actions
    for module, kind in ENTRY_POINTS:
        parser = _parser(module)
        text = " ".join(parser.format_help().split())
        assert text.startswith(f"usage: {module}.py "), (module, text[:80])
        assert text.count("BOOL: True or False") == 1, module
        actions = dest_actions(parser)
        kinds = (kind, flags.SLURM) if module.startswith("submitit_") else (kind,)
        for f in [f for k in kinds for f in flags.flags_of(k)]:
            for a in actions[f.name]:
                assert a.help and "default" in a.help.lower(), (module, f.name, a.help)
                assert a.metavar == "BOOL" if f.type is flags.str2bool else True, (module, f.name)
    assert "epochs to train (default: 100)" in _help_text("main_finetune")
    assert "epochs to train (default: 800)" in _help_text("main_pretrain")
    assert "--force start a fresh run even if this one exists or completed (default: off)" in _help_text("main_finetune")
    assert "--use_amp BOOL autocast" in _help_text("main_finetune")
    assert "CPUs per task (default: --num_workers + 1" in _help_text("submitit_finetune")


def test_help_is_true_per_script():
    """main_pretrain.py --help does not offer what pretraining refuses (any timm model)."""
    ft, pt = _help_text("main_finetune"), _help_text("main_pretrain")
    assert "or any timm model" in ft and "or any timm model" not in pt
    assert "FCMAE pretrains our ConvNeXt V2 encoders only" in pt
    assert "not used by pretraining" in pt and "not used by pretraining" not in ft


def _getattr_defaults():
    """(file:line, name, default) of each `getattr(<x>, "<flag>", <default>)` in the suite's own
    code (default: the literal, or ... for an expression)."""
    import ast
    import subprocess
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    for path in [f for f in files if not f.startswith("tests/")]:
        with open(os.path.join(REPO, path)) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) == 3
                    and isinstance(node.args[1], ast.Constant) and node.args[1].value in flags.BY_NAME):
                default = node.args[2].value if isinstance(node.args[2], ast.Constant) else ...
                yield f"{path}:{node.lineno}", node.args[1].value, default


def test_no_second_default_for_a_flag_both_scripts_have():
    """The flag table holds each default once. A `getattr(args, "flag", default)` repeats one and
    can drift from it: it stands only for a flag that one training script lacks (pretraining
    has no --layer_decay), where its default says what the flag means for that script, or
    with None, asking whether a bare Namespace (a record of another version) has it at all."""
    both = {f.name for f in flags.TABLE if {flags.FT, flags.PT} <= set(f.scripts)}
    found = list(_getattr_defaults())
    assert len(found) > 5, "hardly a getattr found: the search below would prove nothing"
    repeated = [(where, name, d) for where, name, d in found if name in both and d is not None]
    assert not repeated, f"use args.<flag> (both scripts have it): {repeated}"
