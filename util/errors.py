"""User errors: one line with the problem and the fix, exit code 2, no traceback.

Anything a user can cause (a bad flag, path, config key or checkpoint) raises `UserError`, or
in models/ a `ModelError`. A script runs under one boundary, `with user_errors():`, which prints
`error: <message>` and exits 2. Internal faults are not caught here and keep their traceback.
"""
import contextlib
import sys


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""


@contextlib.contextmanager
def user_errors():
    """The error boundary of a script (also a decorator: `@user_errors()`). A ModelError counts
    too: models/errors.py is looked up, not imported, so a script's cheap checks load no torch."""
    try:
        yield
    except Exception as e:
        model_error = getattr(sys.modules.get("models.errors"), "ModelError", ())
        if not isinstance(e, (UserError, model_error)):
            raise
        msg = str(e)
        if "\nOriginal Traceback" in msg:  # raised in a DataLoader worker: its last line is the message
            last = msg.rstrip().splitlines()[-1]
            msg = last.split(": ", 1)[1] if last.startswith(("util.", "UserError")) and ": " in last else last
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)


def as_user_error(e, flags=None):
    """A ModelError (which names the argument it is about) as the UserError a script reports,
    with the argument's flag for it when `flags` ({argument: flag}) knows one."""
    message = str(e)
    for arg, flag in (flags or {}).items():
        if message.startswith(f"{arg} "):
            message = flag + message[len(arg):]
    return UserError(message)


def first_line(e):
    """The first non-empty line of an exception's message: compilers, process-group backends and
    trackers append paragraphs of advice that a one-line report leaves out."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")
