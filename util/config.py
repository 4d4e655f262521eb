"""One resolved config from a YAML file and the command line (command line wins).

A YAML file given with `--config FILE` supplies new *defaults* for the parser's flags; the
command line is then parsed as usual, so any flag written there overrides the file. Values from
YAML go through the flag's own `type` and `choices`, so a file and a command line cannot mean
different things (`blr: 5e-4` is a string to YAML 1.1; `float` makes it 0.0005).

`save_config` writes the resolved flags back as YAML; `--config <run>/config.yaml` reproduces
them, except the per-launch settings in `PER_LAUNCH` (where the run lives, how it was launched).
"""
import argparse
import difflib
import json
import os
import sys

import yaml

from util.errors import UserError
from util.flags import BY_NAME, per_launch, str2bool  # noqa: F401 (str2bool: the flags' type, used here)

# Left out of config.yaml: the flags of one launch (role LAUNCH or LAUNCHER in the flag table),
# which replaying would get wrong (`force` would fork a new run on every relaunch; `output_dir` in a
# copied config would make a variant write into the old run; `start_epoch` is a resume position;
# `device` may name a GPU that is absent later; Slurm flags are unknown to main_*.py). They are
# listed in a comment at the top of the file instead.
PER_LAUNCH = per_launch()

# What RunContext.learned() adds beside the flags under the original scripts' names (a
# checkpoint's args keep them, config.yaml and the signature do not), and `dist_backend`, which
# the original scripts' checkpoints hold; never flags.
RUNTIME_ATTRS = frozenset({"rank", "gpu", "distributed", "dist_backend"})


class Namespace(argparse.Namespace):
    """argparse.Namespace that also remembers which attributes are parser flags.

    The set lives in a slot, not in `vars(args)`, so code that dumps `vars(args)` (logs,
    TensorBoard hparams, checkpoints) does not see it; it survives pickling (submitit) and copy.
    """
    __slots__ = ("_flag_dests",)


def flag_dests(args):
    """The parser dests of `args` (frozenset) when it came from `parse_args`, else None."""
    return getattr(args, "_flag_dests", None)


def set_flag_dests(args, dests):
    """Say which attributes of `args` are flags (a launcher handing the main script only its own)."""
    args._flag_dests = frozenset(dests)


def add_config_args(parser):
    """Add `--config FILE`; a parser that already has it is returned as it is."""
    if "config" in dest_actions(parser):
        return parser
    parser.add_argument("--config", default=None, metavar="FILE", help=BY_NAME["config"].help)
    return parser


def dest_actions(parser):
    """dest -> actions writing it (aliases such as --local_rank/--local-rank share a dest).

    The one reader of argparse's private `parser._actions`: argparse has no public way to list a
    parser's actions, and a config file or search space is checked against the parser it feeds
    (the scripts' parsers come from the flag table, tests build their own)."""
    out = {}
    for a in parser._actions:
        if a.dest != argparse.SUPPRESS and not isinstance(a, (argparse._HelpAction,
                                                                argparse._VersionAction)):
            out.setdefault(a.dest, []).append(a)
    return out


def load_yaml(path):
    """Read a YAML mapping with yaml.safe_load; user mistakes become UserError."""
    if os.path.isdir(path):
        raise UserError(f"config {path} is a directory; give the path of a YAML file")
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"config {path} cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"config {path} (line {line}): not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                        "save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        where = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        if "python/" in str(e):
            raise UserError(f"config {path}{where}: Python tags such as !!python/object are "
                            "refused; write plain YAML values") from None
        raise UserError(f"config {path}{where}: unsupported YAML tag; write plain YAML values") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"config {path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path}: must be a mapping of flag names to values, "
                        f"got a {type(data).__name__}")
    return data


def _convert_scalar(action, value, where):
    """Run one YAML scalar through the flag's type; via str() so 1.5 never becomes int 1."""
    if value is None:
        return None
    if isinstance(value, (list, dict)):
        raise UserError(f"{where}: expects a single value, got {value!r}")
    if action.type in (None, str):
        if isinstance(value, bool):  # `model: yes` or `mode: off` read as booleans by YAML
            raise UserError(f"{where}: expects text, got the YAML boolean {value!r}; quote it")
        return str(value)
    try:
        return action.type(value if isinstance(value, str) else str(value))
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        name = getattr(action.type, "__name__", "the flag's type")
        raise UserError(f"{where}: invalid value {value!r} ({name}: {e})") from None


def convert_value(action, value, where):
    """One value (from a YAML file or a search space) through the flag's own type, nargs and
    choices, exactly as if typed on the command line; mistakes are UserErrors naming `where`."""
    if isinstance(action, argparse.BooleanOptionalAction) or (
            action.nargs == 0 and isinstance(action.const, bool)):  # store_true/false, --x/--no-x
        if value is None:
            return None
        try:
            return str2bool(value)
        except argparse.ArgumentTypeError:
            raise UserError(f"{where}: expects true or false, got {value!r}") from None
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expects a whole number, got {value!r}")
        return value
    if action.nargs == 0:  # store_const with a non-bool const: take the value as written
        return value
    many = action.nargs in ("*", "+", argparse.REMAINDER) or isinstance(action.nargs, int) \
        or isinstance(action, argparse._AppendAction)
    if many and value is not None:
        if not isinstance(value, list):
            raise UserError(f"{where}: expects a list, e.g. [{value!r}]")
        out = [_convert_scalar(action, v, where) for v in value]
        if isinstance(action.nargs, int) and len(out) != action.nargs and \
                not isinstance(action, argparse._AppendAction):
            raise UserError(f"{where}: expects {action.nargs} values, got {len(out)}")
    else:
        out = _convert_scalar(action, value, where)
    if action.choices is not None and out is not None:
        for v in (out if isinstance(out, list) else [out]):
            if v not in action.choices:
                allowed = ", ".join(str(c) for c in action.choices)
                raise UserError(f"{where}: {v!r} is not one of: {allowed}")
    return out


def config_values(parser, path):
    """The YAML file's values, keyed by dest and converted; unknown keys are refused."""
    data = load_yaml(path)
    actions = dest_actions(parser)
    values = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise UserError(f"config {path}: keys must be flag names, got {key!r}")
        dest = key if key in actions else key.replace("-", "_")
        if dest == "config":
            raise UserError(f"config {path}: a config cannot name another config (key {key!r})")
        if dest not in actions:
            close = difflib.get_close_matches(dest, [d for d in actions if d != "config"], n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see --help for the flags"
            raise UserError(f"config {path}: unknown key {key!r} ({hint})")
        if dest in values:
            raise UserError(f"config {path}: {dest!r} is given twice")
        acts = actions[dest]
        main = next((a for a in acts if a.nargs != 0), acts[0])
        values[dest] = convert_value(main, value, f"config {path}: {key}")
    return values


def parse_args(parser, argv=None):
    """Parse argv (default sys.argv[1:]) with the `--config` file's values as defaults. A flag
    the parser does not know is a UserError naming the closest flags (`unknown_flag_message`).

    The parser is left as it was (defaults restored), so it can be used again.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    add_config_args(parser)
    path = None  # the last `--config X` / `--config=X` before a bare `--`, as argparse takes it
    for i, tok in enumerate(argv):
        if tok == "--":
            break
        if tok == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif tok.startswith("--config="):
            path = tok[len("--config="):]
    args = _parse_with(parser, argv, path)
    if args.config and args.config != path:  # an abbreviation such as --conf reached argparse
        args = _parse_with(parser, argv, args.config)
    return args


def _parse_with(parser, argv, path):
    values = config_values(parser, path) if path else {}
    saved = []
    for dest, acts in dest_actions(parser).items():
        if dest in values:
            for a in acts:
                saved.append((a, a.default, a.required))
                a.default, a.required = values[dest], False  # the file may supply a required flag
    try:
        args, unknown = parser.parse_known_args(argv, namespace=Namespace())
    finally:
        for a, default, required in saved:
            a.default, a.required = default, required
    if unknown:
        raise UserError(unknown_flag_message(parser, unknown))
    args._flag_dests = frozenset(dest_actions(parser))
    return args


def unknown_flag_message(parser, unknown):
    """One line for what the parser did not take (instead of argparse's usage and
    "unrecognized arguments"): the first unknown flag and the parser's closest flags."""
    flag = next((u for u in unknown if u.startswith("-") and u.strip("-")), None)
    if flag is None:
        return f"unexpected argument {unknown[0]!r}: flags start with --, e.g. --epochs 10 (see --help)"
    flag = flag.split("=", 1)[0]
    options = {o.lstrip("-"): o for acts in dest_actions(parser).values() for a in acts for o in a.option_strings}
    scored = sorted(((difflib.SequenceMatcher(None, flag.lstrip("-"), name).ratio(), o)
                     for name, o in options.items()), reverse=True)
    close = [o for r, o in scored if r >= 0.6 and r >= scored[0][0] - 0.1][:3] if scored else []
    hint = f"did you mean {', '.join(close)}?" if close else "see --help for the flags"
    return f"unknown flag {flag}; {hint}"


def _plain(v):
    """A YAML-safe (and JSON-safe) form of one value."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(i) for i in v]
    return str(v)


def config_dict(args):
    """The flags worth saving: parser dests (all attributes if unknown) minus PER_LAUNCH."""
    dests = flag_dests(args)
    keys = [k for k in vars(args) if dests is None or k in dests]
    return {k: _plain(getattr(args, k)) for k in sorted(keys)
            if k not in PER_LAUNCH and k not in RUNTIME_ATTRS and not k.startswith("_")}


def save_config(args, path):
    """Write the resolved config to `path` as YAML, atomically (call on rank 0 only)."""
    data = config_dict(args)
    left_out = {k: _plain(v) for k, v in sorted(vars(args).items()) if k in PER_LAUNCH}
    header = ("# Resolved config; reuse with --config (command-line flags still win).\n"
              f"# Left out, per launch: {json.dumps(left_out, default=str)}\n")
    text = yaml.safe_dump(data, sort_keys=True, default_flow_style=False, allow_unicode=True)
    try:
        from models.atomic import atomic_write_text  # not at import: the cheap checks load no models/
        atomic_write_text(path, header + text)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); free disk space or choose "
                        "another --output_dir") from None
