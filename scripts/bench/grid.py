"""The benchmark's grid of settings: the methods, forms and values measured, each setting's id, its package
``Settings`` and its label."""

from __future__ import annotations

import math

from csulora import Settings

METRICS = ("refusal_trained", "refusal_heldout", "new_task_accuracy", "original_accuracy")
INF = math.inf
METHODS = ("csulora", "realign", "safe-lora", "resta")
FORMS = {"csulora": ("factored", "block"), "realign": ("factored", "block"), "safe-lora": ("factored",),
         "resta": ("factored", "block")}  # fmt: skip
GRID = {
    "csulora": {"lam": [0.1, 0.5, 2, 8, 64, INF], "subspace": ["eta=0.25", "eta=0.5", "k=1", "k=4"]},
    "realign": {"lam": [1, 4, INF], "beta": [0, 0.25, 0.5, 1], "subspace": ["k=1", "k=2", "k=4", "k=8"]},
    "safe-lora": {"tau": [0.3, 0.5, 0.7, 0.9, 1.0], "top_n": [2, 4, 8, 16]},
    # γ ∈ {1, 2} destroyed the original tasks on merged weights (the issue), so smaller γ too
    "resta": {"gamma": [0.05, 0.1, 0.25, 0.5, 1, 2], "subspace": ["k=1", "k=8"]},
}
# issue 19: stronger pulls toward the alignment (β > 0.5), where the refined worlds' good settings lie; the drop-in
# (factored) form at k = 8 only (the default's k), measured on mixed adapters only: the added run stays under 40 min of
# the shared CPU
WIDE = {"realign": {"lam": [1, 4, INF], "beta": [0.75, 1.5], "subspace": ["k=8"]}}
QUICK = ["none", "csulora:factored:lam=8:eta=0.25", "csulora:block:lam=64:k=1",
         "realign:factored:lam=inf:beta=0.25:k=4", "realign:block:lam=4:beta=0:k=1", "safe-lora:tau=0.5",
         "safe-lora:top-n=4", "resta:factored:gamma=0.1:k=8", "resta:block:gamma=0.5:k=1"]  # fmt: skip


def subspace_kwargs(label: str) -> dict:
    name, value = label.split("=")
    return {"subspace_energy": float(value)} if name == "eta" else {"subspace_rank": int(value)}


def _num(x: float) -> str:
    return "inf" if x == INF else f"{x:g}"


def grid() -> list[dict]:
    """Every setting of the benchmark, ``none`` first: ``{"id", "method", "form", "lam", "beta", "subspace",
    "tau", "top_n"}`` (``None`` where it does not apply; λ = ∞ is ``"inf"``)."""
    out = [{"id": "none", "method": "none", "form": None}]
    g = GRID["csulora"]
    for form in FORMS["csulora"]:
        for sub in g["subspace"]:
            for lam in g["lam"]:
                out.append({"id": f"csulora:{form}:lam={_num(lam)}:{sub}", "method": "csulora", "form": form,
                            "lam": _num(lam), "subspace": sub})  # fmt: skip
    g = GRID["realign"]
    for form in FORMS["realign"]:
        for sub in g["subspace"]:
            for lam in g["lam"]:
                for beta in g["beta"]:
                    out.append({"id": f"realign:{form}:lam={_num(lam)}:beta={beta:g}:{sub}", "method": "realign",
                                "form": form, "lam": _num(lam), "beta": beta, "subspace": sub})  # fmt: skip
    g = WIDE["realign"]
    for sub in g["subspace"]:
        for lam in g["lam"]:
            for beta in g["beta"]:
                out.append({"id": f"realign:factored:lam={_num(lam)}:beta={beta:g}:{sub}", "method": "realign",
                            "form": "factored", "lam": _num(lam), "beta": beta, "subspace": sub})  # fmt: skip
    g = GRID["resta"]
    for form in FORMS["resta"]:
        for sub in g["subspace"]:
            for gamma in g["gamma"]:
                out.append({"id": f"resta:{form}:gamma={gamma:g}:{sub}", "method": "resta", "form": form,
                            "gamma": gamma, "subspace": sub})  # fmt: skip
    for tau in GRID["safe-lora"]["tau"]:
        out.append({"id": f"safe-lora:tau={tau:g}", "method": "safe-lora", "form": "factored", "tau": tau})
    for n in GRID["safe-lora"]["top_n"]:
        out.append({"id": f"safe-lora:top-n={n}", "method": "safe-lora", "form": "factored", "top_n": n})
    for s in out:
        for k in ("lam", "beta", "subspace", "tau", "top_n", "gamma"):
            s.setdefault(k, None)
    return out


def for_models(s: dict) -> bool:
    """Whether a setting is one of those measured on full fine-tunes, which every method corrects by its exact
    form (no factored / block), Safe LoRA by a threshold (``--top-n`` needs two passes over a model) and RESTA with
    the whole ``D`` (its subspace changes nothing but the report): the factored ids stand for them."""
    if s["method"] == "none":
        return True
    if s["method"] == "safe-lora":
        return s["tau"] is not None
    return s["form"] == "factored" and (s["method"] != "resta" or s["subspace"] == "k=8")


def to_settings(s: dict) -> Settings:
    """The package's ``Settings`` of a grid setting (what ``csulora sanitize`` builds from the same options)."""
    if s["method"] == "safe-lora":
        extra = {"top_n": s["top_n"]} if s["top_n"] is not None else {"threshold": s["tau"]}
        return Settings(method="safe-lora", **extra)
    if s["method"] == "resta":
        return Settings(method="resta", form=s["form"], gamma=s["gamma"], **subspace_kwargs(s["subspace"]))
    extra = {"beta": s["beta"]} if s["beta"] is not None else {}
    return Settings(method=s["method"], form=s["form"], lam=float(s["lam"]), **extra, **subspace_kwargs(s["subspace"]))


def label(s: dict) -> str:
    """A setting as people read it: ``realign block λ=∞ β=0.25 k=4``."""
    if s["method"] == "none":
        return "no defense"
    if s["method"] == "safe-lora":
        return f"safe-lora τ={s['tau']:g}" if s["tau"] is not None else f"safe-lora top-{s['top_n']}"
    if s["method"] == "resta":
        return f"resta {s['form']} γ={s['gamma']:g} {s['subspace']}"
    lam = "∞" if s["lam"] == "inf" else s["lam"]
    sub = s["subspace"].replace("eta", "η")
    beta = f" β={s['beta']:g}" if s["beta"] is not None else ""
    return f"{s['method']} {s['form']} λ={lam}{beta} {sub}"
