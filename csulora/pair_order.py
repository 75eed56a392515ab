"""Which checkpoint is the aligned one and which the base: a swapped pair is refused (issue 20).

A swap reverses ``D = W_a − W_b``, so every method pushes the update *away* from alignment and the report's
erosion changes sign, without any other symptom. The metadata csulora reads anyway says which is which:

- the model the adapter was trained on (its ``base_model_name_or_path``; a full model's card ``base_model``)
  is the aligned one, so naming the checkpoint given as ``--base`` is a swap;
- the base checkpoint's own card says ``base_model: <the checkpoint given as --aligned>``: the "base" was made
  from the "aligned" one, a swap.

No weight-based signal is used: the one measured (the sign of the adapters' erosion against ``D``) does not tell
a swap from an adapter that strengthens alignment (docs/audit.md, "Swapped checkpoints").
"""

from __future__ import annotations

from pathlib import Path

from .checkpoints import CheckpointRef, card_base_model, parse_ref
from .errors import CsuloraError

OVERRIDE = "--allow-swapped"


def names_checkpoint(named: str, ref: CheckpointRef) -> bool:
    """Whether a name found in metadata (``base_model_name_or_path``, a card's ``base_model``) names ``ref``: the
    same reference, or the same last path component (a Hub id ``org/llama-chat`` names a local copy
    ``/models/llama-chat``; docs/design-notes.md, "base resolution")."""
    try:
        if parse_ref(named).same_as(ref):
            return True
    except CsuloraError:
        pass
    own = ref.path.name if ref.path is not None else ref.repo_id.split("/")[-1]
    return Path(named.partition("@")[0].rstrip("/")).name.lower() == own.lower()


def _only(named: str | None, ref: CheckpointRef, other: CheckpointRef) -> bool:
    """``named`` names ``ref`` and not ``other`` (two folders of one name tell nothing)."""
    return named is not None and names_checkpoint(named, ref) and not names_checkpoint(named, other)


def check_pair_order(
    aligned: CheckpointRef,
    base: CheckpointRef,
    base_source: str,
    *,
    trained_on: str | None = None,
    trained_on_what: str = "the adapter's base_model_name_or_path",
    allow_swapped: bool = False,
) -> dict:
    """Refuse a swapped aligned/base pair (``CsuloraError``, exit 2, naming both and the evidence) unless
    ``allow_swapped``; return what the metadata said, for the report (``inputs.pair_order``): ``verdict``
    (``agrees``, ``no metadata says``, or ``swapped, allowed by --allow-swapped``) and ``evidence`` (sentences).

    ``base_source``: where the base came from (``--base``, ``adapter config``, ``aligned model card``); only a base
    given as ``--base`` can contradict ``trained_on`` (by the default rule the adapter's named model *is* the base
    when it is not the aligned one, DESIGN.md §6). ``trained_on``: the model the subject was fine-tuned from, as its
    metadata names it (None: no subject, e.g. ``csulora subspace``)."""
    swapped, agrees = [], []
    if trained_on is not None:
        if base_source == "--base" and _only(trained_on, base, aligned):
            swapped.append(f"{trained_on_what} is {trained_on!r}, the checkpoint given as --base")
        elif _only(trained_on, aligned, base):
            agrees.append(f"{trained_on_what} names the aligned checkpoint")
    base_card = card_base_model(base)
    if _only(base_card, aligned, base):
        swapped.append(f"the model card of {base} says base_model: {base_card!r}, the checkpoint given as --aligned")
    aligned_card = card_base_model(aligned)
    if _only(aligned_card, base, aligned):
        agrees.append("the aligned model's card names the base as its base_model")
    verdict = "swapped, allowed by " + OVERRIDE if swapped else "agrees" if agrees else "no metadata says"
    order = {"verdict": verdict, "evidence": swapped or agrees}
    if swapped and not allow_swapped:
        raise CsuloraError(f"--aligned {aligned} and --base {base} look swapped: {'; '.join(swapped)}. Pass the "
                           f"safety-aligned model as --aligned and the pretrained one as --base, or {OVERRIDE} if "
                           "this order is right")  # fmt: skip
    return order
