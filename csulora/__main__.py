import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python loads the command: one line, not a traceback
    print("interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)

main()
