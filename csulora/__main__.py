"""``python -m csulora`` and the ``csulora`` script: the command, with a Ctrl-C during its imports as one line."""

import sys


def main() -> None:
    try:
        from .cli import main as run
    except KeyboardInterrupt:  # while Python loads the command (typer, rich): one line, not a traceback
        print("interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
