"""The promotion gate: champion or challenger for a new model version.

A pure function of the metrics, kept apart from MLflow so every branch is a plain unit test;
:mod:`pilamim.registry.store` applies its decision as aliases and tags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class Decision:
    action: Literal["champion", "challenger"]
    reason: str
    gate_metric: str
    value: float
    champion_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_promotion(new_metrics: Mapping[str, float],
                     champion_metrics: Mapping[str, float] | None,
                     gate_metric: str = "probe_top1", min_improvement: float = 0.0,
                     floor: float = 0.0, new_context: Mapping[str, str] | None = None,
                     champion_context: Mapping[str, str] | None = None) -> Decision:
    """Champion or challenger for a new version; pure, so every branch is a unit test.

    ``*_context`` say what the numbers were measured on (``data_digest``, ``protocol``); a
    number only beats a number measured the same way (``new_context`` None: not compared).

    * below ``floor`` -> challenger, whatever the champion;
    * no champion yet -> champion;
    * measured on other data or by another protocol than the champion -> challenger, the
      reason naming both (a human can still ``pilamim promote`` it);
    * champion lacks the gate metric (gate changed) -> champion, said in the reason;
    * ``new - champion > 0`` and ``>= min_improvement`` -> champion; else challenger.
    """
    if gate_metric not in new_metrics:
        raise ValueError(f"gate metric {gate_metric!r} missing from the new version's metrics "
                         f"{sorted(new_metrics)}")
    value = float(new_metrics[gate_metric])
    best = None
    if champion_metrics is not None and gate_metric in champion_metrics:
        best = float(champion_metrics[gate_metric])
    if not math.isfinite(value):
        return Decision(CHALLENGER, f"{gate_metric}={value} is not a finite number",
                        gate_metric, value, best)
    if value < floor:
        return Decision(CHALLENGER, f"{gate_metric}={value:.4f} is below the floor {floor:.4f}",
                        gate_metric, value, best)
    if champion_metrics is None:
        return Decision(CHAMPION, f"first version to clear the floor ({gate_metric}="
                        f"{value:.4f} >= {floor:.4f}); no champion yet", gate_metric, value)
    unlike = None if new_context is None else _unlike(new_context, champion_context or {})
    if unlike:
        return Decision(CHALLENGER, f"not comparable with the champion: {unlike}; promote it "
                        "by hand if it should win", gate_metric, value, best)
    if best is None:
        return Decision(CHAMPION, f"current champion has no {gate_metric} to compare; "
                        f"{gate_metric}={value:.4f} clears the floor {floor:.4f}",
                        gate_metric, value)
    gain = value - best
    if gain > 0 and gain >= min_improvement - 1e-12:
        return Decision(CHAMPION, f"{gate_metric}={value:.4f} beats champion {best:.4f} by "
                        f"{gain:+.4f} (required >= {min_improvement:.4f})",
                        gate_metric, value, best)
    return Decision(CHALLENGER, f"{gate_metric}={value:.4f} vs champion {best:.4f}: change "
                    f"{gain:+.4f} does not reach the required improvement "
                    f"{'> 0' if min_improvement == 0 else f'>= {min_improvement:.4f}'}",
                    gate_metric, value, best)


def _unlike(new: Mapping[str, str], champion: Mapping[str, str]) -> str:
    """What differs between how the two versions were measured ('' when nothing does)."""
    differences = []
    for key, what in (("data_digest", "data"), ("protocol", "eval protocol")):
        mine, theirs = new.get(key), champion.get(key)
        if mine != theirs or not mine:
            differences.append(f"{what} {mine or '(unknown)'} vs champion's "
                               f"{theirs or '(unknown, registered before it was recorded)'}")
    return "; ".join(differences)
