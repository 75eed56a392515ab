"""The parts of ``scripts/bench_safety.py`` (run that script; these modules are its pieces).

Imports go one way, no circles:

- ``grid``: the settings of the benchmark, their ids, ``Settings`` and labels (imports nothing of this package);
- ``run``: measuring one world, every adapter under every setting (→ ``grid``);
- ``analysis``: front scores, means, leave-one-world-out choices, the rule check, the decision and the recommended
  ``METHOD_DEFAULTS`` (→ ``grid``);
- ``render``: the Markdown report (→ ``analysis``, ``grid``);
- ``plots``: the PNGs (→ ``analysis``, ``grid``);
- ``outputs``: the json, the files written and the terminal summary (→ ``analysis``, ``render``, ``plots``).
"""
