#!/usr/bin/env python3
"""Write docs/cli-help.txt: `csulora --help` and every command's `--help` at 80 columns, as a terminal shows them.

Rerun after changing an option (tests/test_cli_help.py compares the file with the current help):

    .venv/bin/python scripts/cli_help.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from csulora.cli import app  # noqa: E402
from csulora.help import render_help  # noqa: E402

SNAPSHOT = REPO / "docs" / "cli-help.txt"
COMMANDS = ["sanitize", "audit", "sweep", "eval", "subspace", "demo"]
WIDTH = 80


def snapshot() -> str:
    parts = [f"$ csulora {' '.join(args)} --help  (COLUMNS={WIDTH})\n\n" + render_help(app, args, WIDTH)
             for args in [[], *([c] for c in COMMANDS)]]  # fmt: skip
    head = "Made by `python scripts/cli_help.py`; tests/test_cli_help.py checks it is current.\n\n"
    return head + "\n".join(parts)


if __name__ == "__main__":
    SNAPSHOT.write_text(snapshot())
    print(f"wrote {SNAPSHOT}")
