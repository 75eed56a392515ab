"""Which checkpoint is the aligned one and which the base: a swapped pair is refused (issue 20).

A swap reverses ``D = W_a − W_b``, so every method pushes the update *away* from alignment and the report's
erosion changes sign, without any other symptom. The metadata csulora reads anyway says which is which:

- the model the adapter was trained on (its ``base_model_name_or_path``; a full model's card ``base_model``)
  is the aligned one, so naming the checkpoint given as ``--base`` is a swap;
- the base checkpoint's own card says ``base_model: <the checkpoint given as --aligned>``: the "base" was made
  from the "aligned" one, a swap.

The weights alone cannot refuse a pair: on the shipped worlds every adapter's erosion is negative in the right
order and (but for one with a full-weight module) positive when swapped, and every full fine-tune's erosion is above
−0.5 in the right order and below it when swapped (for a dense update a swap maps ``e`` to ``−e − 1``), but an
adapter that strengthens alignment, or a fine-tune that undid more than half of it, looks the same as a swap
(docs/audit.md, "Swapped checkpoints"). Where no metadata says anything, ``weight_hint`` turns them into a warning.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CsuloraError
from .io.checkpoints import CheckpointRef, card_base_model, parse_ref, public_name

OVERRIDE = "--allow-swapped"
NO_METADATA = "no metadata says"


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
            swapped.append(f"{trained_on_what} is {public_name(trained_on)!r}, the checkpoint given as --base")
        elif _only(trained_on, aligned, base):
            agrees.append(f"{trained_on_what} names the aligned checkpoint")
    base_card = card_base_model(base)
    if _only(base_card, aligned, base):
        swapped.append(f"the model card of {public_name(base.spec)} says base_model: {public_name(base_card)!r}, the "
                       "checkpoint given as --aligned")
    aligned_card = card_base_model(aligned)
    if _only(aligned_card, base, aligned):
        agrees.append("the aligned model's card names the base as its base_model")
    verdict = "swapped, allowed by " + OVERRIDE if swapped else "agrees" if agrees else NO_METADATA
    order = {"verdict": verdict, "evidence": swapped or agrees}
    if swapped and not allow_swapped:
        raise CsuloraError(f"--aligned {aligned} and --base {base} look swapped: {'; '.join(swapped)}. Pass the "
                           f"safety-aligned model as --aligned and the pretrained one as --base, or {OVERRIDE} if "
                           "this order is right")  # fmt: skip
    return order


def weight_hint(order: dict, erosion: float, full_model: bool) -> str | None:
    """A warning where no metadata said which checkpoint is which and the weights look swapped: an adapter whose
    erosion is positive, a full model whose erosion is below −0.5 (a swap maps a dense update's ``e`` to ``−e − 1``).
    Never a refusal: an adapter that strengthens alignment looks the same (docs/audit.md, "Swapped checkpoints")."""
    if order.get("verdict") != NO_METADATA:
        return None
    if full_model and erosion < -0.5:
        what = f"the model's erosion is {erosion:+.3f}: it is nearer the base than the aligned model in the subspace"
    elif not full_model and erosion > 0:
        what = f"the adapter's erosion is {erosion:+.3f}: it strengthens the aligned directions"
    else:
        return None
    return (f"{what}, as a swapped pair would look; no metadata says which checkpoint is the aligned one: check that "
            "--aligned is the safety-aligned model and --base the pretrained one")
