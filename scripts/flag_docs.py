"""After adding or changing a flag in util/flags.py, run `python scripts/flag_docs.py`: it writes
what the flag table decides elsewhere, so that no list is kept by hand.

- docs/errors.md: the table of ranges and choices (between its `flag-checks` markers);
- docs/runs.md: the outcome flags version 2 did not have, each with the default a version-2 run
  directory needs it at (between its `flags-since-v2` markers);
- tests/fixtures/outcome_defaults_v<N>.json: a new outcome flag joins the record with its
  default. A changed default is refused, not recorded: it changes what signatures mean, so it is
  a signature version bump (docs/runs.md, "Upgrades").

`--check` changes nothing and exits 1 when a file is out of date (what tests/test_docs.py and
tests/test_runs.py assert).
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from util import flags, runs  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "fixtures", f"outcome_defaults_v{runs.SIGNATURE_VERSION}.json")
SCRIPT_NAMES = {flags.FT: "fine-tuning", flags.PT: "pretraining"}


def flags_since_v2():
    """The markdown list of outcome flags each script has that version 2 did not."""
    rows = []
    for f in flags.TABLE:
        kinds = [k for k in f.scripts if k in runs.V2_FLAGS and f.role == flags.OUTCOME
                 and f.name not in runs.V2_FLAGS[k]]
        if kinds:
            where = " and ".join(SCRIPT_NAMES[k] for k in kinds)
            defaults = {json.dumps(flags.canonical(f.default_for(k))) for k in kinds}
            rows.append(f"- `--{f.name}` ({where}): default `{'`, `'.join(sorted(defaults))}`")
    return "\n".join(rows) + "\n"


def replaced(path, marker, body):
    """The text of `path` with the part between `<!-- marker:start -->` and its end replaced."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        sys.exit(f"error: {os.path.relpath(path, ROOT)} lost its {marker} markers; put them back around the list")
    return text, pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main(check=False):
    old = ""  # a new signature version starts its own record
    if os.path.exists(FIXTURE):
        with open(FIXTURE) as f:
            old = f.read()
    recorded = json.loads(old) if old else {}
    now = runs.outcome_defaults()
    changed = {k: (v, now[k]) for k, v in recorded.items() if k in now and now[k] != v}
    if changed:
        sys.exit(f"error: outcome defaults changed (recorded, now): {changed}; that is a signature version "
                 "bump: raise SIGNATURE_VERSION in util/runs.py and record the new version (docs/runs.md)")
    record = json.dumps({**recorded, **now}, indent=1, sort_keys=True)
    files = {FIXTURE: (old, record)}
    files[os.path.join(ROOT, "docs", "errors.md")] = replaced(os.path.join(ROOT, "docs", "errors.md"),
                                                              "flag-checks", flags.markdown())
    files[os.path.join(ROOT, "docs", "runs.md")] = replaced(os.path.join(ROOT, "docs", "runs.md"),
                                                            "flags-since-v2", flags_since_v2())
    stale = [path for path, (old, new) in files.items() if old != new]
    for path in stale:
        print(f"{'out of date' if check else 'updated'}: {os.path.relpath(path, ROOT)}")
        if not check:
            with open(path, "w", encoding="utf-8") as f:
                f.write(files[path][1])
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(check=sys.argv[1:] == ["--check"]))
