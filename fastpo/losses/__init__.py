"""Preference objectives (DPO and its family) and fused linear preference losses.

- `LOSSES` / `preference_loss`: the registry of objectives on per-sequence statistics
  (`PreferenceInputs` -> `LossOutput`); see `fastpo.losses.objectives` for the uniform contract.
- `dpo_loss`, `simpo_loss`, `cpo_loss`, `orpo_loss`, `kto_loss`, `plackett_luce_loss`: TRL-style functions
  on sequence log-probs.
- `fused_linear_preference_loss`: hidden states + LM-head weight in, loss and TRL-named metrics out
  (generic and pair-fused paths); `fused_linear_preference_loss_ref` is its naive reference.
- `FusedLinear{DPO,SimPO,ORPO,CPO,KTO}Loss`: drop-in replacements for Liger-Kernel's modules.
"""

from fastpo.losses.functional import fused_linear_preference_loss, plan_chunks, resolve_path, response_logps
from fastpo.losses.metrics import add_sums, metric_means, metric_sums
from fastpo.losses.modules import (
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearKTOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
)
from fastpo.losses.objectives import LOSSES, Objective, is_pair_local, kto_reference_point, preference_loss
from fastpo.losses.reference import fused_linear_preference_loss_ref
from fastpo.losses.sequence import (
    cpo_loss,
    dpo_loss,
    kto_loss,
    ld_weights,
    orpo_loss,
    plackett_luce_loss,
    sequence_logps,
    simpo_loss,
)
from fastpo.losses.types import (
    FusedLossOutput,
    LossOutput,
    PairLosses,
    PreferenceInputs,
    ResponseLayout,
    SequenceStats,
    UnpairedLosses,
)

__all__ = [
    "LOSSES", "Objective", "preference_loss", "is_pair_local", "kto_reference_point",
    "dpo_loss", "simpo_loss", "cpo_loss", "orpo_loss", "kto_loss", "plackett_luce_loss", "sequence_logps",
    "ld_weights", "fused_linear_preference_loss", "fused_linear_preference_loss_ref", "plan_chunks",
    "response_logps", "resolve_path", "metric_sums", "metric_means", "add_sums",
    "FusedLinearDPOLoss", "FusedLinearSimPOLoss", "FusedLinearORPOLoss", "FusedLinearCPOLoss", "FusedLinearKTOLoss",
    "PreferenceInputs", "LossOutput", "PairLosses", "UnpairedLosses", "FusedLossOutput", "ResponseLayout",
    "SequenceStats",
]
