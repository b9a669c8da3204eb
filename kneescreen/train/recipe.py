"""The default recipe: which member sets `kneescreen train` fits and compares, decided from the
settings and the number of development (non-test) films. Pure: no Ray, no torch.

- ``--members`` given: exactly those members, one set; the recipe steps aside.
- otherwise the frozen default (`DEFAULT_MEMBERS`), and from ``--finetune-min-films``
  development films on (`FINETUNE_MIN_FILMS`, 0 = never) also the fine-tuned candidates
  (``--finetune-members``), alone and together with the frozen members. Every member is trained
  once (out of fold, then its deployable run); `kneescreen.model.member_sets` then chooses the set
  by the out-of-fold rule, the frozen set being the baseline a fine-tuned set must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

from kneescreen.train.config import MemberSpec, TrainConfig

EXPLICIT, FROZEN, FINETUNED, BOTH = "members", "frozen", "finetuned", "frozen+finetuned"


@dataclass(frozen=True)
class Recipe:
    """The member sets to compare (the first is the baseline) and why these.

    Attributes:
        sets: set name -> its members, in the order compared.
        reason: one sentence for the manifest and the log.
    """

    sets: dict[str, tuple[MemberSpec, ...]]
    reason: str

    @property
    def members(self) -> tuple[MemberSpec, ...]:
        """Every member some set holds, once each, in first-seen order (what is trained)."""
        return tuple(dict.fromkeys(spec for specs in self.sets.values() for spec in specs))


def plan(cfg: TrainConfig, n_dev: int) -> Recipe:
    """The member sets for ``n_dev`` development films.

    Raises:
        KneescreenError: a bad member string (``--members`` or ``--finetune-members``).
    """
    frozen = cfg.member_specs()
    if cfg.members:
        return Recipe({EXPLICIT: frozen}, "--members given: exactly those members")
    if cfg.finetune_min_films <= 0:
        return Recipe({FROZEN: frozen}, "--finetune-min-films 0: fine-tuned candidates never offered")
    if n_dev < cfg.finetune_min_films:
        return Recipe({FROZEN: frozen}, f"{n_dev} development films < --finetune-min-films "
                                        f"{cfg.finetune_min_films}: fine-tuned candidates not offered")
    tuned = cfg.finetune_specs()
    both = tuple(dict.fromkeys(frozen + tuned))
    return Recipe({FROZEN: frozen, FINETUNED: tuned, BOTH: both},
                  f"{n_dev} development films >= --finetune-min-films {cfg.finetune_min_films}: "
                  f"fine-tuned candidates offered, the set chosen out of fold")


def input_keys(cfg: TrainConfig) -> list[str]:
    """Every input some set may need, so the split is decoded once, before the films are counted
    (with the default members and fine-tuned candidates that is one input: the 224 px film)."""
    specs = cfg.member_specs() + (cfg.finetune_specs() if cfg.offers_finetuning() else ())
    return sorted({s.input_key for s in specs})
