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
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
    return wrapper
