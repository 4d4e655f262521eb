"""User errors: one line with the problem and the fix, exit code 2, no traceback.

Anything a user can cause (a bad flag, path, config key or checkpoint) raises `UserError`.
Entry points wrap `main` in `exit_on_user_error`, which prints `error: <message>` and exits 2.
Internal faults are not caught here and keep their traceback.
"""
import functools
import sys


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""


def exit_on_user_error(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {_message(e)}", file=sys.stderr, flush=True)
            sys.exit(2)
    return wrapper


def _message(e):
    """The one line. A UserError raised in a DataLoader worker reaches the main process with the
    worker's traceback folded into its message; its last line is the original message."""
    msg = str(e)
    if "\nOriginal Traceback" in msg:
        last = msg.rstrip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if last.startswith(("util.", "UserError")) and ": " in last else last
    return msg
