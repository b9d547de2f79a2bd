"""``fidelity.md`` + ``fidelity.json`` from the runs' results: tables, reading, params."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from . import reading
from .budgets import BUDGET_NOTES
from .lowlevel import NUM_BINS
from .stats import LABELS, METRICS, Summary, comparisons, table, targets, to_json

LOWLEVEL_TEXT = f"""\
**Task.** Within each class, the training images are cut into {NUM_BINS} equal-count bins of
mean pixel intensity (how much of the frame is ink, and how bright it is); val/test
images get the bin of their class's training edges. The label is balanced and, by
construction, independent of the class: knowing the class gives chance, 1/{NUM_BINS}
= {100 / NUM_BINS:.1f} %. A frozen encoder only beats chance if its [CLS] feature still
carries the image's global intensity — a photometric, pixel-level property that a
representation tuned to be invariant within a class is free to discard. That is the same
question the paper's CLEVR count/distance tasks ask (properties the object category does not
determine), on our data set. The raw-pixel floor is the natural reference: mean intensity is
a linear function of the pixels, so only the per-class thresholds are hard for it."""

PROTOCOLS_TEXT = """\
- **Linear probe** (paper protocol, `pilamim.evaluate.linear_probe.run_linear_probe`):
  frozen encoder's [CLS] after the final norm, features extracted once (no augmentation),
  BatchNorm1d(affine=False) + Linear, LARS, warm-up + cosine; the base lr is chosen per
  entry on the val split from the params' grid, test reported once. The raw-pixel floor
  feeds the flattened normalised image through the same head, optimizer and grid.
- **kNN**: cosine, k and temperature from the probe params, train features as memory bank
  (computed by the same call). docs/METHOD.md: pixel-only models score low on kNN at short
  schedules, so kNN is never read alone.
- **Fine-tune** (MAE protocol, `pilamim.evaluate.finetune.run_finetune`): the exported
  encoder + avg-pool head, AdamW with layer decay; MAE's regularisers as the params'
  `regularisation` decides. Run for PiLaMIM and the random-init floor only (the question it
  answers is whether pretraining pays; it costs more than every other protocol together).
- **Low-level probe / kNN**: the same probe and kNN on the same frozen features, labels
  from the task below."""


def pct(s: Summary | None, with_std: bool = True) -> str:
    if s is None:
        return "—"
    return f"{100 * s.mean:.2f} ± {100 * s.std:.2f}" if with_std else f"{100 * s.mean:.2f}"


def _one(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def build(runs: Sequence[Mapping[str, Any]], entries: Sequence[str], meta: Mapping[str, Any]
          ) -> tuple[str, dict[str, Any]]:
    """(markdown, json object) for every run in ``runs`` (nothing left out)."""
    summary = table(runs)
    order = [e for e in entries if e in summary] + sorted(set(summary) - set(entries))
    comps = comparisons(summary)
    goals = targets(summary)
    md = _markdown(runs, order, summary, comps, goals, meta)
    data = {**meta, "entries": order, "metrics": METRICS, "runs": list(runs),
            "summary": to_json(summary), "comparisons": to_json(comps), "targets": goals}
    return md, data


def _markdown(runs, order, summary, comps, goals, meta) -> str:
    seeds = sorted({r["seed"] for r in runs})
    expected = meta.get("expected_runs")
    by_time = sorted(runs, key=lambda r: r.get("finished_at", ""))
    commands = dict.fromkeys([*(r["command"] for r in by_time if r.get("command")),
                              meta["command"]])
    lines = [
        "# Fidelity study: PiLaMIM against its own baselines",
        "",
        f"Budget **{meta['budget']}** · seeds {', '.join(map(str, seeds)) or '—'} · "
        f"{len(runs)} runs" + (f" of {expected} planned" if expected else "") +
        f" · written {time.strftime('%Y-%m-%d %H:%M %Z')} · study fingerprint "
        f"`{meta['fingerprint']}`",
        "",
        "Reproduce: the commands that made these runs (each run's JSON records its own; "
        "rerunning them reuses finished runs), the last of which wrote this report:",
        "",
        "```",
        *commands,
        "```",
        "",
        "## Results (test split, %, mean ± std over seeds)",
        "",
        "| entry | seeds | " + " | ".join(METRICS.values()) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for e in order:
        n = max((s.n for s in summary[e].values() if s is not None), default=0)
        cells = [pct(summary[e][m]) for m in METRICS]
        lines.append(f"| {LABELS.get(e, e)} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "![mean ± std per entry, dots are single seeds](fidelity.png)", ""]
    lines += reading.section(summary, comps, goals, runs, meta)
    lines += ["", "## Every run (nothing left out)", "",
              "| entry | seed | " + " | ".join(METRICS.values()) +
              " | pretrain steps | pretrain s | eval s | total s | CPU s | reused |",
              "|---|---|" + "---|" * (len(METRICS) + 6)]
    for r in sorted(runs, key=lambda r: (order.index(r["entry"]), r["seed"])):
        t = r["timing"]
        steps = (r.get("pretrain") or {}).get("steps", "—")
        eval_s = t.get("probe_s", 0.0) + t.get("finetune_s", 0.0)
        lines.append(
            f"| {LABELS.get(r['entry'], r['entry'])} | {r['seed']} | "
            + " | ".join(_one(r["metrics"].get(m)) for m in METRICS)
            + f" | {steps} | {t['pretrain_s']:.0f} | {eval_s:.0f} | {t['total_s']:.0f} | "
            f"{t['cpu_s']:.0f} | {'yes' if r.get('cached') else 'no'} |")
    total = sum(r["timing"]["total_s"] for r in runs)
    lines += ["", f"Wall-clock: runs sum to **{total / 60:.1f} min**; this invocation took "
              f"{meta['invocation_s'] / 60:.1f} min (including data preparation and decoding "
              f"the eval images; reused runs cost nothing). Device: {meta['device']}, "
              f"{meta.get('jobs', 1)} worker process(es) x {meta['torch_threads']} torch "
              "thread(s). 'reused' = results JSON from an "
              "earlier invocation of the same study (resume)."]
    if meta.get("ignored"):
        lines += ["", f"Ignored {len(meta['ignored'])} results JSON made with other study "
                  "params: " + ", ".join(f"`{p}`" for p in meta["ignored"])]
    lines += ["", "## The low-level task", "", LOWLEVEL_TEXT, "",
              f"Measured here: class-only accuracy on test = "
              f"{100 * meta['lowlevel']['class_only_test']:.1f} % (chance "
              f"{100 / NUM_BINS:.1f} %).", "",
              "## Protocols", "", PROTOCOLS_TEXT, "",
              f"## Budget `{meta['budget']}`: how it was chosen", "",
              BUDGET_NOTES.get(meta["budget"], "(no notes)"), "",
              "## Params (shared by every run)", ""]
    lines += _params_lines(meta)
    return "\n".join(lines) + "\n"


def _params_lines(meta: Mapping[str, Any]) -> list[str]:
    p = meta["params"]
    m, pre, pr, ft, d = p["model"], p["pretrain"], p["probe"], p["finetune"], p["data"]
    counts = meta["split_sizes"]
    lr = f"lr {pre['lr']}" if pre["lr"] else f"lr = base_lr {pre['base_lr']} x batch / 256"
    depth = f", {m['depth']} blocks" if m.get("depth") else ""
    out = [
        f"- Data: embedded Fashion-MNIST subset, {d['max_images_per_class'] or 'all'} images "
        f"per class → train {counts['train']}, val {counts['val']}, test {counts['test']}.",
        f"- Model: `{m['size']}` ViT{depth} ({meta['encoder_params'] / 1e6:.2f} M encoder "
        "params), "
        f"{m['img_size']} px, patch {m['patch_size']}, mask ratio {m['mask_ratio']}, decoders "
        f"{m['decoder_depth']} x {m['decoder_width']} ({m['decoder_heads']} heads), init "
        f"{m['init']}, norm_pix_loss {m['norm_pix_loss']}, target_init {m['target_init']}.",
        f"- Pretrain: {pre['epochs']} epochs, batch {pre['batch_size']} x accum "
        f"{pre['accum_steps']}, {lr}, warm-up {pre['warmup_epochs']} epochs, weight decay "
        f"{pre['weight_decay']}, RRC scale "
        f"{pre['crop_scale']} + hflip {pre['hflip']}, precision {pre['precision']}.",
        f"- Probe: {pr['optimizer']}, {pr['epochs']} epochs ({pr['warmup_epochs']} warm-up), "
        f"batch {pr['batch_size']}, base_lr {pr['base_lr']} (chosen on val), weight decay "
        f"{pr['weight_decay']}; kNN k={pr['knn_k']}, "
        f"T={pr['knn_temperature']}.",
        f"- Fine-tune: {ft['epochs']} epochs ({ft['warmup_epochs']} warm-up), batch "
        f"{ft['batch_size']}, base_lr {ft['base_lr']}, layer decay {ft['layer_decay']}, "
        f"drop path {ft['drop_path']}, label smoothing {ft['label_smoothing']}, "
        f"regularisation `{ft['regularisation']}` (mixup {ft['mixup']}, cutmix {ft['cutmix']}, "
        f"RandAugment `{ft['randaugment']}` only under `mae`).",
        "", "<details><summary>all params (YAML; folders and seeds differ per run)</summary>", "",
        "```yaml", yaml.safe_dump(p, sort_keys=False).rstrip(), "```", "", "</details>",
    ]
    if meta.get("overrides"):
        out.insert(0, "- Overrides (`--set`): " + ", ".join(f"`{o}`" for o in meta["overrides"]))
    return out
