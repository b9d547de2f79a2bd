"""What in the short-schedule recipe handicaps the latent branch: each suspect is one named
option away from the embedded default.

The default itself is the x1 fidelity study (``<out>/fidelity_runs``); a suspect is a study of
its own in ``<out>/suspects/<name>/``. A suspect is chosen on the val split and confirmed on
test with seeds; the reading is generated from the numbers with the study's spread rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import LABELS, METRICS, Summary, cell, compare, describe, summarize


@dataclass(frozen=True)
class Suspect:
    sets: tuple[str, ...]  # --set overrides from the embedded default
    why: str  # the hypothesis, shown in the report
    entries: tuple[str, ...] = ("pilamim",)  # presets the option changes


SUSPECTS: dict[str, Suspect] = {
    "ema_faster": Suspect(
        ("pretrain.ema_momentum=[0.99, 1.0]",),
        "the EMA momentum schedule (0.996 -> 1 per step) was set for 100k+ steps; over 960 the "
        "target may lag the encoder too much to be a useful target"),
    "latent_weight_half": Suspect(
        ("model.latent_weight=0.5",),
        "the latent and [CLS] losses (weight 1 each) outweigh the pixel loss at this scale"),
    "latent_weight_double": Suspect(
        ("model.latent_weight=2.0",),
        "the opposite: the latent branch is too weak to shape the features"),
    "cls_weight_half": Suspect(
        ("model.cls_weight=0.5",),
        "the [CLS] loss pulls [CLS] toward the target's whole-image summary, which carries "
        "low-level content; without it (pilamim_nocls) kNN matches MAE's at the same probe"),
    "target_layer_norm": Suspect(
        ("model.latent_target_norm=layer_norm",),
        "unnormalised targets: the target's final-norm output keeps a learned scale and shift "
        "that drift with the EMA; I-JEPA normalises each target token again"),
    "decoder_128": Suspect(
        ("model.decoder_width=128",),
        "64-wide, 1-block decoders are too small for the latent task (the encoder is 128 wide), "
        "so the encoder does the decoder's work", ("pilamim", "mae")),
    "norm_pix": Suspect(
        ("model.norm_pix_loss=true",),
        "pixel-target normalisation (MAE's per-patch norm_pix) changes what both pixel "
        "branches learn", ("pilamim", "mae")),
}
DEFAULT = "default"  # the x1 study's own runs
VAL = ("val_top1", "val_knn_top1")
TEST = ("top1", "knn_top1")


def study_dir(root: Path, name: str) -> Path:
    return root if name == DEFAULT else root / "suspects" / name


def _probe(results: Sequence[Mapping[str, Any]], entry: str, key: str) -> Summary | None:
    return summarize(r["details"]["probe"][key] for r in results
                     if r["entry"] == entry and r["details"]["probe"].get(key) is not None)


def table(results: Mapping[str, Sequence[Mapping[str, Any]]]
          ) -> dict[tuple[str, str], dict[str, Summary | None]]:
    """(variant, entry) -> metric -> Summary, for val and test probe/kNN."""
    out = {}
    for name, rows in results.items():
        for entry in dict.fromkeys(r["entry"] for r in rows):
            if entry in ("pilamim", "mae", "pilamim_nocls", "latent"):
                out[name, entry] = {k: _probe(rows, entry, k) for k in (*VAL, *TEST)}
    return out


def markdown(results: Mapping[str, Sequence[Mapping[str, Any]]], meta: Mapping[str, Any]) -> str:
    rows = table(results)
    lines = [
        "# The suspects: what in the short-schedule recipe handicaps the latent branch", "",
        f"Written by `{meta['command']}` on {meta['written_at']}. Each suspect is one option "
        "away from the embedded default (x1, `fidelity.md` beside this file); probe and kNN "
        "top-1 in %, mean ± sample std over seeds. Chosen on **val**; test is read only to "
        "confirm.", "",
        "| suspect | option | entry | val probe | val kNN | test probe | test kNN |",
        "|---|---|---|---|---|---|---|"]
    for (name, entry), m in sorted(rows.items(), key=lambda kv: (kv[0][0] != DEFAULT, kv[0])):
        option = "(embedded default)" if name == DEFAULT else ", ".join(
            f"`{s}`" for s in SUSPECTS[name].sets)
        lines.append(f"| {name} | {option} | {LABELS.get(entry, entry)} | "
                     + " | ".join(cell(m[k]) for k in (*VAL, *TEST)) + " |")
    lines += ["", "## Hypotheses", ""]
    lines += [f"- **{name}** ({', '.join(f'`{s}`' for s in s_.sets)}): {s_.why}."
              for name, s_ in SUSPECTS.items() if name in results]
    lines += ["", "## Reading (generated from the numbers)", "",
              "A difference counts only when |difference of means| is larger than the pooled "
              "seed std; with one seed no comparison is a finding.", "", *reading(rows)]
    return "\n".join(lines) + "\n"


def reading(rows: Mapping[tuple[str, str], Mapping[str, Summary | None]]) -> list[str]:
    """Per val metric: each suspect against the default (same entry), the best one for
    PiLaMIM, and PiLaMIM against MAE under it (MAE's default where the suspect leaves it)."""
    lines: list[str] = []
    for key, metric in (("val_top1", "probe_top1"), ("val_knn_top1", "knn_top1")):
        best = None
        for (name, entry), m in sorted(rows.items()):
            val, ref = m.get(key), rows.get((DEFAULT, entry), {}).get(key)
            if name == DEFAULT or val is None or ref is None:
                continue
            said = describe(compare(val, ref, metric, entry, entry))
            lines.append(f"- {name}: " + said.replace(
                f"{LABELS[entry]} vs {LABELS[entry]}", f"{LABELS[entry]} with it vs without")
                + " (val)")
            if entry == "pilamim" and (best is None or val.mean > best[1].mean):
                best = (name, val)
        base = rows.get((DEFAULT, "pilamim"), {}).get(key)
        if best is not None and base is not None:
            name, val = best
            lines.append(f"- Best suspect for PiLaMIM on val {METRICS[metric]}: **{name}** "
                         f"({100 * val.mean:.2f} vs the default's {100 * base.mean:.2f}).")
            mae = rows.get((name, "mae"), {}).get(key) or rows.get((DEFAULT, "mae"), {}).get(key)
            if mae is not None:
                gap = compare(val, mae, metric, "pilamim", "mae")
                lines.append(f"- Under it, {describe(gap)} (val).")
        lines.append("")
    return lines
