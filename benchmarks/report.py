"""Summaries, the printed table and the PNG chart, all made from the JSON rows of a benchmark run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The parts of a run's end-to-end time, in the order they happen; they add up to it (see ``benchmarks.harness``).
STAGES = (
    ("text_encode_s", "text encode"),
    ("denoise_s", "denoise"),
    ("vae_decode_s", "VAE decode"),
    ("other_s", "other (set-up, checks, image conversion)"),
)
# SD 1.5 UNet: 803 GFLOP per image at a 64x64 latent (torch FLOP counter); VAE decode at 512x512: 2.51 TFLOP.
SD15_UNET_FLOP_64 = 803e9
SD15_VAE_FLOP_512 = 2.51e12
SD15_CLIP_FLOP = 0.03e12
DENSE_FP16_FLOPS = 800e12  # what an H100/H200 reaches on dense fp16/bf16 matrix work


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def compute_floor_s(row: dict[str, Any]) -> float | None:
    """Seconds the SD 1.5 work would take at 800 TFLOP/s (latent-area scaling; CFG doubles the UNet batch)."""
    c = row["config"]
    if c["source"] != "sd15-random":
        return None
    area = (c["height"] // 8) * (c["width"] // 8) / 64**2
    unet_batch = c["batch"] * (2 if c["guidance"] > 1 else 1)
    flop = SD15_UNET_FLOP_64 * area * unet_batch * c["steps"]
    flop += SD15_VAE_FLOP_512 * area * c["batch"] + SD15_CLIP_FLOP * 2
    return flop / DENSE_FP16_FLOPS


def median_runs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run whose end-to-end time is the median, or the middle two of an even count (their mean is the median)."""
    ordered = sorted(rows, key=lambda r: r["end_to_end_s"])
    return ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]


def row_label(row: dict[str, Any]) -> str:
    """A row's line in the table: its backend, with ``N=<interval>`` when it ran with step caching."""
    return str(row.get("label", row["backend"]))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per backend (and cache interval), in the order they ran; speed-up is against the first one's
    median, and a cached one's denoise and end-to-end medians are also given as a fraction of its uncached ones.

    The stage times are the median run's (the mean of the middle two for an even count), so they add up to the
    median end-to-end time; medians taken stage by stage would not, and a chart of them would not reach its label.
    """
    order = list(dict.fromkeys(row_label(r) for r in rows))
    summaries = []
    for name in order:
        mine = [r for r in rows if row_label(r) == name]
        e2e = [r["end_to_end_s"] for r in mine]
        summary = {
            "backend": mine[0]["backend"],
            "label": name,
            "cache_interval": mine[0].get("cache_interval", 1),
            "cache_schedule": mine[0].get("cache_schedule"),
            "full_steps": mine[0].get("full_steps"),
            "denoise_median_s": percentile([r["denoise_s"] for r in mine], 0.5),
            "precision": mine[0]["precision"],
            "runs": len(mine),
            "median_s": percentile(e2e, 0.5),
            "p90_s": percentile(e2e, 0.9),
            "peak_memory_gib": max(r["peak_memory_bytes"] for r in mine) / 2**30,
            "peak_added_gib": max(r.get("peak_added_bytes", 0) for r in mine) / 2**30,
            "loaded_gib": mine[0].get("loaded_bytes", 0) / 2**30,
            "memory_scope": mine[0].get("peak_memory_scope", "backend"),
            "order": mine[0].get("order", "sequential"),
            "it_per_s": percentile([r["it_per_s"] for r in mine], 0.5),
            "images_per_s": percentile([r["images_per_s"] for r in mine], 0.5),
            "step_median_s": percentile([r["step_median_s"] for r in mine], 0.5),
        }
        for kind in ("full", "shallow"):  # a cached row's full and shallow steps, apart
            found = [r[f"{kind}_step_median_s"] for r in mine if r.get(f"{kind}_step_median_s") is not None]
            summary[f"{kind}_step_median_s"] = percentile(found, 0.5) if found else None
        middle = median_runs(mine)
        for key, _ in STAGES:
            summary[key] = sum(r[key] for r in middle) / len(middle)
        summary["other_pct"] = 100 * summary["other_s"] / summary["median_s"]
        floor = compute_floor_s(mine[0]) if mine[0]["env"].get("gpu") else None
        summary["floor_fraction"] = floor / summary["median_s"] if floor else None
        summaries.append(summary)
    base = summaries[0]["median_s"]
    for s in summaries:
        s["speedup"] = base / s["median_s"]
    compare_cached(summaries, rows)
    return summaries


def compare_cached(summaries: list[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> None:
    """Give each cached summary its denoise and end-to-end medians as fractions of its backend's uncached ones,
    and the median over rounds of its denoise time over the uncached one's in the same round.

    On a machine whose load drifts, the per-round ratio compares runs made minutes apart at most, where the ratio
    of medians may compare a loaded run with a quiet one."""
    uncached = {s["backend"]: s for s in summaries if s["cache_interval"] == 1}
    for s in summaries:
        base = uncached.get(s["backend"]) if s["cache_interval"] > 1 else None
        s["denoise_vs_uncached"] = s["denoise_median_s"] / base["denoise_median_s"] if base else None
        s["end_to_end_vs_uncached"] = s["median_s"] / base["median_s"] if base else None
        s["denoise_vs_uncached_per_round"] = None
        if base:
            plain = {r.get("round"): r["denoise_s"] for r in rows if row_label(r) == base["label"]}
            ratios = [r["denoise_s"] / plain[r.get("round")] for r in rows if row_label(r) == s["label"]
                      if plain.get(r.get("round"))]  # fmt: skip
            s["denoise_vs_uncached_per_round"] = percentile(ratios, 0.5) if ratios else None


def cache_notes(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """One line per cached summary: its denoise and end-to-end medians against the same backend uncached."""
    lines = []
    for s in summaries:
        if s.get("denoise_vs_uncached") is None:
            continue
        schedule = s.get("cache_schedule") or "uniform"
        per_round = s.get("denoise_vs_uncached_per_round")
        rounds = f" (per round, median: {per_round:.2f}x)" if per_round is not None else ""
        steps = ""
        if s.get("full_step_median_s") and s.get("shallow_step_median_s"):
            steps = f", step median full {s['full_step_median_s'] * 1e3:.1f}ms, shallow "
            steps += f"{s['shallow_step_median_s'] * 1e3:.1f}ms"
        lines.append(
            f"{s['label']}: denoise {s['denoise_vs_uncached']:.2f}x{rounds} and end-to-end "
            f"{s['end_to_end_vs_uncached']:.2f}x of {s['backend']} uncached (step caching, {schedule}: "
            f"{s['full_steps']} full UNet steps{steps})"
        )
    return lines


def precision_note(summaries: Sequence[dict[str, Any]]) -> str | None:
    """A warning when the rows ran different precisions (their speed-ups then compare unlike arithmetic)."""
    base = summaries[0]["precision"]
    others = ", ".join(f"{row_label(s)} {s['precision']}" for s in summaries if s["precision"] != base)
    if not others:
        return None
    return (
        f"* mixed precision: {others} against {row_label(summaries[0])} {base}, so those speed-ups are not "
        "like for like; --precision auto times every backend alike (fp32 on a CPU, fp16 on CUDA)"
    )


def format_table(summaries: list[dict[str, Any]]) -> str:
    """The table of ``summarize``'s rows; notes under it mark mixed precision and process-wide peak memory."""
    width = max([20, *(len(row_label(s)) for s in summaries)])
    head = (
        f"{'backend':<{width}} {'prec':<5} {'median':>9} {'p90':>9} {'speed-up':>8} {'text':>8} {'denoise':>9} "
        f"{'step':>8} {'VAE':>8} {'it/s':>7} {'other':>8} {'peak mem':>9} {'run +mem':>9} {'loaded':>9} "
        f"{'of floor':>8}"
    )
    lines = [head, "-" * len(head)]
    base = summaries[0]["precision"]
    for s in summaries:
        floor = f"{100 * s['floor_fraction']:.1f}%" if s["floor_fraction"] else "-"
        precision = s["precision"] + ("*" if s["precision"] != base else "")
        denoise = s.get("denoise_median_s", s["denoise_s"])
        lines.append(
            f"{row_label(s):<{width}} {precision:<5} {s['median_s'] * 1e3:>7.0f}ms {s['p90_s'] * 1e3:>7.0f}ms "
            f"{s['speedup']:>7.2f}x {s['text_encode_s'] * 1e3:>6.1f}ms {denoise * 1e3:>7.0f}ms "
            f"{s['step_median_s'] * 1e3:>6.1f}ms {s['vae_decode_s'] * 1e3:>6.0f}ms {s['it_per_s']:>7.2f} "
            f"{s['other_pct']:>7.2f}% "
            f"{s['peak_memory_gib']:>6.2f}GiB {s['peak_added_gib']:>6.2f}GiB {s['loaded_gib']:>6.2f}GiB {floor:>8}"
        )
    note = precision_note(summaries)
    if note:
        lines.append(note)
    lines.extend(cache_notes(summaries))
    lines.append(
        "denoise is the median over runs; text, VAE and other are the median run's; other: set-up before the first "
        "step (schedule, starting noise), the check for NaN pixels and the conversion to images, as % of the median"
    )
    if any(s.get("memory_scope") == "process" for s in summaries):
        lines.append(
            "runs interleaved, every backend open: 'peak mem' is the whole process's peak during a backend's runs "
            "(all open backends included); 'run +mem' is what one run added at its peak, 'loaded' what opening "
            "the backend added"
        )
    return "\n".join(lines)


def chart_segments(summary: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, seconds) of one backend's stacked bar: the median run's stages, adding up to its median time."""
    return [(label, summary[key]) for key, label in STAGES]


def plot(summaries: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Stacked bars of the median run's stages, one per backend, labelled with the median (which they add up to).

    Each bar's name carries its precision; a mixed-precision chart says so in its title. Returns None when
    matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping the chart (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(summaries) + 2), 4))
    names = [f"{row_label(s)}\n{s['precision']}" for s in summaries]
    bottom = [0.0] * len(summaries)
    for k, (label, _) in enumerate(chart_segments(summaries[0])):
        values = [chart_segments(s)[k][1] * 1e3 for s in summaries]
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    if precision_note(summaries):
        title = f"{title}\nmixed precision: speed-ups not like for like" if title else "mixed precision"
    for x, s in enumerate(summaries):
        ax.text(
            x, bottom[x], f"{s['median_s'] * 1e3:.0f} ms\n{s['speedup']:.2f}x", ha="center", va="bottom", fontsize=8
        )
    ax.set_ylabel("median end-to-end time (ms)")
    ax.set_ylim(0, max(bottom) * 1.25)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target
