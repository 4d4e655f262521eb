"""Docs that derive from code stay in step with it."""
import os
import re

from util import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_errors_md_table_of_checks_is_the_flag_tables():
    """docs/errors.md shows the flag table's ranges and choices as `python -m util.flags
    --markdown` prints them; a check added, removed or changed in util/flags.py without
    regenerating the doc fails here."""
    with open(os.path.join(REPO, "docs", "errors.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- flag-checks:start -->\n(.*?)<!-- flag-checks:end -->", text, re.S)
    assert m, "docs/errors.md lost its flag-checks markers"
    assert m.group(1) == flags.markdown(), "regenerate it: python -m util.flags --markdown"


def test_every_flag_has_help_and_a_known_role():
    for f in flags.TABLE:
        assert f.help.strip(), f"--{f.name} has no help text"
        assert f.role in (flags.OUTCOME, flags.SETTING, flags.LAUNCH, flags.LAUNCHER), f.name
        assert set(f.scripts) <= set(flags.SCRIPTS) and f.scripts, f.name


def test_help_lists_every_flag_of_the_script():
    for kind in ("finetune", "pretrain"):
        text = flags.build_parser(kind, "x").format_help()
        for f in flags.flags_of(kind):
            assert f"--{f.name}" in text, (kind, f.name)
