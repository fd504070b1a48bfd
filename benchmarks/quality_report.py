"""The quality suites' results as people read them: mean ± std over seeds, paired deltas, the AUC's sampling error,
the Markdown table with the oracle ceilings, and the scaling plots (benchmarks/quality.py runs the suites)."""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

from hyformer.zoo import ARCHITECTURES
from jobs.common import pyplot

REFERENCE = "longer-rankmixer"  # the paper's production baseline: every delta is against it
COUNTING = "counting"  # the counting baseline's row (hyformer/counting.py)
SCALING_ARCHS = ("hyformer", REFERENCE)
EVAL_KEYS = (
    "eval_auc",
    "eval_query_auc",
    "eval_user_auc",
    "eval_logloss",
    "eval_oracle_auc",
    "eval_oracle_query_auc",
    "eval_oracle_ns_auc",
    "eval_oracle_seq_auc",
)


def mean_std(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
    }


def summarize(
    runs: list[dict[str, Any]], sizes: dict[str, dict[str, Any]], rows: list[str]
) -> dict[str, dict[str, Any]]:
    out = {}
    for row in rows:
        rs = [r for r in runs if r["row"] == row]
        out[row] = {
            k: mean_std([r.get(k) for r in rs]) for k in (*EVAL_KEYS, "eval_mean_len_long", "samples_per_s")
        } | sizes[row]
        out[row] |= {
            k: rs[0][k] for k in ("arch", "label", "table", "long_len", "side_info", "size") if rs and k in rs[0]
        }
    return out


def _pm(stat: dict[str, float | None], spec: str = ".4f") -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:{spec}}" + (f" ± {stat['std']:{spec}}" if stat["std"] is not None else "")


def paired_delta(runs: list[dict[str, Any]], row: str, ref: str, key: str = "eval_auc") -> dict[str, float | None]:
    """Relative difference (%) of ``row``'s ``key`` to ``ref``'s, seed by seed (the same batches and held-out rows):
    mean and sample std over the seeds."""
    a = {r["seed"]: r[key] for r in runs if r["row"] == row}
    b = {r["seed"]: r[key] for r in runs if r["row"] == ref}
    return mean_std([100 * (a[k] - b[k]) / b[k] for k in sorted(a) if k in b])


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982): the standard error of an AUC measured on ``positives`` + ``negatives`` rows, i.e. how
    much it would move on another sample of held-out rows of the same size."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)) / (
        positives * negatives
    )
    return math.sqrt(max(var, 0.0))


def _delta(res: dict[str, Any], row: str, ref: str) -> str:
    if row == ref:
        return "ref."
    d = paired_delta(res["runs"], row, ref)
    if d["mean"] is None:
        return "-"
    return f"{d['mean']:+.2f}%" + (f" ± {d['std']:.2f}" if d["std"] is not None else "")


def table(res: dict[str, Any]) -> str:
    """The suite's Markdown table (+ the setup line)."""
    s, suite = res["summary"], res["suite"]
    w = res["window"]
    first = res["runs"][0]
    positives = round(first["eval_rows"] * first["eval_ctr"])
    se = auc_standard_error(first["eval_auc"], positives, int(first["eval_rows"]) - positives)
    ref_text = (
        "the same architecture and length with side info 3"
        if suite == "side-info"
        else f"{REFERENCE} (of the same size)"
    )
    lines = [
        f"Suite `{suite}`: {w['train_samples']:,} training samples ({w['train_days']} days), "
        f"{w['eval_samples']:,} held-out rows "
        f"({w['eval_days']} days, {w['eval_requests']:,} requests, {positives:,} clicks), {res['epochs']} epoch(s), "
        f"{res['seeds']} seeds: mean ± sample std over the seeds. "
        f"ΔAUC: relative AUC difference to {ref_text}, seed by seed "
        f"(same batches, same rows), mean ± std. "
        f"One AUC on these rows has a sampling error of ±{se:.4f} (Hanley-McNeil): "
        "differences between models on the same rows vary less, but one smaller than that may not hold on other days.",
        "",
    ]
    has_oracle = any(r["eval_oracle_auc"]["mean"] is not None for r in s.values())
    oracle_cols = " | oracle AUC | oracle query AUC" if has_oracle else ""
    lines += _ceilings(s)
    if suite == "side-info":
        lines += [
            f"| long seq (mean events seen) | architecture | side info | AUC | ΔAUC (side 3 → 7) | query AUC "
            f"| dense params (M) | GFLOPs/step{oracle_cols} |",
            "|---|---|---:|---:|---:|---:|---:|---:" + ("|---:|---:|" if has_oracle else "|"),
        ]
        for row, r in s.items():
            base = row.replace("side=7", "side=3")
            d = _delta(res, row, base) if r["side_info"] == 7 else "-"
            lines.append(
                f"| {r['long_len']} ({r['eval_mean_len_long']['mean']:.0f}) | {r['arch']} | {r['side_info']} | "
                f"{_pm(r['eval_auc'])} | {d} | {_pm(r['eval_query_auc'])} | "
                f"{r['dense_params'] / 1e6:.3f} | {r['train_gflops']:.2f}" + _oracle(r, has_oracle) + " |"
            )
    else:
        lines += _main_table(res, has_oracle)
    return "\n".join(lines) + "\n"


def _stat(r: dict[str, Any], key: str) -> dict[str, Any]:
    """A summary statistic of a row; results written before the key existed have none."""
    return r.get(key, {"mean": None, "std": None, "n": 0})


def _ceilings(s: dict[str, Any]) -> list[str]:
    """The oracle's AUC split by what each part of the click model needs (synthetic logs), and how much of the gap
    between HyFormer without sequences and the oracle each row closes."""
    any_row = next(iter(s.values()))
    if _stat(any_row, "eval_oracle_ns_auc")["mean"] is None:
        return []
    ceil = {k: _stat(any_row, k)["mean"] for k in ("eval_oracle_auc", "eval_oracle_ns_auc", "eval_oracle_seq_auc")}
    lines = [
        f"Ceilings on these rows (the click model's true probability, AUC): every term {ceil['eval_oracle_auc']:.4f}; "
        f"without the history-only terms (current interest, favourite authors) {ceil['eval_oracle_ns_auc']:.4f}; the "
        f"history-only terms alone {ceil['eval_oracle_seq_auc']:.4f}. What sequences can add is about the first minus "
        "the second (a model without sequences still sees the user and query ids, so this is a guide, not a bound).",
        "",
    ]
    if "hyformer-no-seq" in s:
        floor = s["hyformer-no-seq"]["eval_auc"]["mean"]
        gap = ceil["eval_oracle_auc"] - floor
        closed = ", ".join(
            f"{row} {100 * (r['eval_auc']['mean'] - floor) / gap:+.0f}%"
            for row, r in s.items()
            if row != "hyformer-no-seq" and gap > 0
        )
        lines += [f"Share of the gap between `hyformer-no-seq` ({floor:.4f}) and the oracle closed: {closed}.", ""]
    return lines


def _main_table(res: dict[str, Any], has_oracle: bool) -> list[str]:
    """Tables 1-2 and scaling: one row per model, deltas paired by seed against the suite's references."""
    s, suite = res["summary"], res["suite"]
    refs = [("ΔAUC", None)]  # None: the row's own reference (LONGER + RankMixer of the same size)
    if suite == "tables":
        refs += [
            (f"ΔAUC vs {name}", row) for name, row in (("HyFormer", "hyformer"), ("counting", COUNTING)) if row in s
        ]
    user_auc = any(_stat(r, "eval_user_auc")["mean"] is not None for r in s.values())
    first = (
        "| size | architecture | d_model / d_seq / layers" if suite == "scaling" else "| table | architecture | d_model"
    )
    heads = [
        "AUC",
        *(h for h, _ in refs),
        "query AUC",
        *(["user AUC"] if user_auc else []),
        "logloss",
        "dense params (M)",
        "GFLOPs/step",
    ]
    heads += ["oracle AUC", "oracle query AUC"] if has_oracle else []
    lines = [f"{first} | " + " | ".join(heads) + " |", "|---|---|---|" + "---:|" * len(heads)]
    for row, r in s.items():
        ref = f"{REFERENCE} size={r['size']}" if suite == "scaling" else REFERENCE
        if suite == "scaling":
            head = f"| {r['size']} | {r['arch']} | {r['d_model']} / {r.get('d_seq', '-')} / {r.get('n_layers', '-')}"
        else:
            head = f"| {r.get('table') or '-'} | {r.get('label', row)} (`{row}`) | {r['d_model']}"
        cells = [_pm(r["eval_auc"]), *(_delta(res, row, other or ref) for _, other in refs), _pm(r["eval_query_auc"])]
        cells += [_pm(r["eval_user_auc"])] if user_auc else []
        cells += [_pm(r["eval_logloss"]), f"{r['dense_params'] / 1e6:.3f}", f"{r['train_gflops']:.2f}"]
        lines.append(f"{head} | " + " | ".join(cells) + _oracle(r, has_oracle) + " |")
    return lines


def _oracle(r: dict[str, Any], has_oracle: bool) -> str:
    # the oracle scores the same rows whatever the seed: its mean is its value
    mean = lambda k: "-" if r[k]["mean"] is None else f"{r[k]['mean']:.4f}"
    return f" | {mean('eval_oracle_auc')} | {mean('eval_oracle_query_auc')}" if has_oracle else ""


def scaling_plots(res: dict[str, Any], out_dir: str) -> list[str]:
    """AUC vs dense params and vs training FLOPs (log x), one line per architecture, seeds' std as error bars."""
    plt = pyplot()

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    s = res["summary"]
    for x_key, x_label, fname in (
        ("dense_params", "dense parameters", "scaling_params.png"),
        ("train_gflops", "training GFLOPs per step (batch 256)", "scaling_flops.png"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for arch in SCALING_ARCHS:
            rows = sorted((r for r in s.values() if r["arch"] == arch), key=lambda r: r[x_key])
            ax.errorbar(
                [r[x_key] for r in rows],
                [r["eval_auc"]["mean"] for r in rows],
                yerr=[r["eval_auc"]["std"] or 0.0 for r in rows],
                marker="o",
                capsize=3,
                label=ARCHITECTURES[arch].label,
            )
        # the oracle is named in the title, not drawn: a line at its level would flatten the curves' differences
        oracle = [r["eval_oracle_auc"]["mean"] for r in s.values() if r["eval_oracle_auc"]["mean"] is not None]
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("held-out AUC (mean ± std over seeds)")
        title = f"AUC vs {x_label.split(' (')[0]} ({res['seeds']} seeds)"
        ax.set_title(
            title + (f"\noracle AUC on the same rows: {statistics.fmean(oracle):.4f}" if oracle else ""), fontsize=10
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = f"{out_dir}/{fname}"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
