"""The two kinds of failure a user sees, mapped to exit codes in one place (cli.py)."""


class CsuloraError(Exception):
    """Bad usage or bad input: one clear line (what, where, what to do); exit code 2."""


class OutputExists(CsuloraError):
    """The output folder exists (or appeared while this run was writing it) and may not be replaced."""


class GateFailed(Exception):
    """An audit threshold was exceeded, or an adapter of a batch failed; exit code 1."""


def one_line(e: BaseException | str) -> str:
    """A message from a library may span lines; the user gets one."""
    return " ".join(str(e).split())
