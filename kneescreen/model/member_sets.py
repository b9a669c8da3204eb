"""Choosing the member set the recipe deploys (`kneescreen.train.recipe`): the frozen members,
the fine-tuned candidates, or both, by the out-of-fold rule that chooses the deployed predictor.

Each set is fit as a bundle on its own (`kneescreen.model.ensemble.fit_ensemble`: calibration,
fusion and the deployed predictor chosen by `SELECTION_RULE` on pooled out-of-fold predictions).
The sets are then compared the same way (`MEMBER_SET_RULE`): the highest pooled out-of-fold
balanced accuracy of the set's deployed predictor, ties going to fewer members, then to the
earlier set; a set other than the first (the baseline: frozen, cheap) is chosen only when the
paired bootstrap says its deployed predictor beats the baseline's with probability at least
``confidence``. A fine-tuned set that is merely lucky on the folds does not displace frozen heads.
"""

from __future__ import annotations

import numpy as np

from kneescreen.metrics import paired_bootstrap
from kneescreen.model.manifest import BundleManifest

MEMBER_SET_RULE = ("each set's deployed predictor chosen by the selection rule; the set whose deployed predictor "
                   "has the max pooled out-of-fold balanced accuracy (ties: fewer members, then the earlier set); "
                   "a set other than the baseline (the first) must beat the baseline's deployed predictor in "
                   "balanced accuracy with paired-bootstrap probability >= confidence, else the baseline is chosen")


def choose_member_set(fitted: dict[str, tuple[BundleManifest, np.ndarray]], y: np.ndarray,
                      confidence: float = 0.9, n_boot: int = 2000) -> tuple[str, dict]:
    """Choose among fitted member sets by `MEMBER_SET_RULE`.

    Args:
        fitted: set name -> (its manifest, its deployed predictor's pooled out-of-fold
            probabilities), in the recipe's order; the first is the baseline.
        y: true class per pooled row (the same rows for every set).
        confidence: paired-bootstrap probability a set must beat the baseline with.

    Returns:
        (chosen set, the record for the manifest's ``selection["member_sets"]``: rule, baseline,
        per set its members, deployed predictor, out-of-fold balanced accuracy and the paired
        bootstrap against the baseline, and ``chosen``).
    """
    names = list(fitted)
    if not names:
        raise ValueError("choose_member_set: no member sets")
    base = names[0]
    record: dict = {"rule": MEMBER_SET_RULE, "confidence": confidence, "baseline": base, "sets": {}}
    for name, (manifest, probs) in fitted.items():
        sel = manifest.selection
        entry = {"members": [m.name for m in manifest.members], "deployed": sel["deployed"],
                 "balanced_accuracy": float(sel["candidates"][sel["deployed"]]["balanced_accuracy"])}
        if name != base:
            entry["vs_baseline"] = paired_bootstrap(y, probs, fitted[base][1], n_boot=n_boot)["balanced_accuracy"]
        record["sets"][name] = entry
    sets = record["sets"]
    best = min(names, key=lambda n: (-round(sets[n]["balanced_accuracy"], 9), len(sets[n]["members"]),
                                     names.index(n)))
    if best != base:
        p_better = sets[best]["vs_baseline"]["p_a_better"] or 0.0
        if p_better < confidence:
            record["not_chosen"] = {"name": best, "p_better_than_baseline": p_better}
            best = base
    record["chosen"] = best
    return best, record
