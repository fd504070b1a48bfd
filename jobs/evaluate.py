"""Evaluation on the held-out day: predictions and the paper's metrics (§4.1.3) next to the oracle's.

``metrics`` is what every training epoch reports: AUC, query-level AUC (AUC within each request, averaged over the
requests that have both labels), logloss, and the same AUCs of the synthetic ground-truth ``p_click`` on the same rows
(the oracle: the best any model could do on these rows). Where the rows carry them, the AUCs of ``p_click_ns`` (the
click model without its history-only terms) and ``p_click_seq`` (bias, history-only terms and noise) go next to it
(``oracle_ns_*``, ``oracle_seq_*``): what the signals that need sequences can add, next to what a model's sequences
do add. They split the click model's terms, they are not ceilings of a model class (``features.synth``).
``plots`` draws ROC and calibration for MLflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from hyformer.metrics import auc, group_auc, logloss
from jobs.common import pyplot

PARTIAL_ORACLES = {"oracle_ns": "p_click_ns", "oracle_seq": "p_click_seq"}  # metric prefix -> optional batch key


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Run the model over batches; returns label, prob, request_id, p_click, p_click_ns and p_click_seq as numpy
    arrays (the last two NaN for batches without them)."""
    was_training = model.training
    model.eval()
    out: dict[str, list[np.ndarray]] = {
        k: [] for k in ("label", "prob", "request_id", "p_click", *PARTIAL_ORACLES.values())
    }
    for batch in batches:
        out["prob"].append(torch.sigmoid(model(batch).float()).cpu().numpy())
        for k in ("label", "request_id", "p_click"):
            out[k].append(batch[k].cpu().numpy())
        for k in PARTIAL_ORACLES.values():
            out[k].append(batch[k].cpu().numpy() if k in batch else np.full(len(out["prob"][-1]), np.nan, np.float32))
    model.train(was_training)
    return {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in out.items()}


def metrics(pred: Mapping[str, np.ndarray], prefix: str = "eval_") -> dict[str, float]:
    """AUC, query-level AUC, logloss of the model and AUCs of the oracle ``p_click`` on the same rows; the AUCs of
    ``p_click_ns`` / ``p_click_seq`` too where ``pred`` has them (absent or NaN: no such keys)."""
    y, p, g, oracle = pred["label"], pred["prob"], pred["request_id"], pred["p_click"]
    m = {
        "auc": auc(y, p),
        "query_auc": group_auc(y, p, g),
        "logloss": logloss(y, p),
        "rows": float(len(y)),
        "ctr": float(np.mean(y)) if len(y) else float("nan"),
        "mean_pred": float(np.mean(p)) if len(p) else float("nan"),
    }
    if len(oracle) and not np.isnan(oracle).any():
        m |= {
            "oracle_auc": auc(y, oracle),
            "oracle_query_auc": group_auc(y, oracle, g),
            "oracle_logloss": logloss(y, oracle),
        }
    for name, key in PARTIAL_ORACLES.items():
        s = pred.get(key)
        if s is not None and len(s) and not np.isnan(s).any():
            m |= {f"{name}_auc": auc(y, s), f"{name}_query_auc": group_auc(y, s, g)}
    return {prefix + k: float(v) for k, v in m.items()}


def plots(pred: Mapping[str, np.ndarray], path_prefix: str) -> list[str]:
    """ROC curve (model and oracle) and calibration plot as PNG files; returns their paths."""
    plt = pyplot()

    y = pred["label"].astype(bool)
    paths = []
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, s in (("model", pred["prob"]), ("oracle p_click", pred["p_click"])):
        if np.isnan(s).any() or y.all() or (~y).all():
            continue
        order = np.argsort(-s)
        tpr = np.concatenate([[0], np.cumsum(y[order]) / y.sum()])
        fpr = np.concatenate([[0], np.cumsum(~y[order]) / (~y).sum()])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(y, s):.4f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, held-out day")
    ax.legend(loc="lower right")
    paths.append(f"{path_prefix}roc.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    bins = np.quantile(pred["prob"], np.linspace(0, 1, 11)) if len(y) else np.linspace(0, 1, 11)
    idx = np.clip(np.searchsorted(bins, pred["prob"], side="right") - 1, 0, 9)
    mean_p = [pred["prob"][idx == i].mean() for i in range(10) if (idx == i).any()]
    mean_y = [y[idx == i].mean() for i in range(10) if (idx == i).any()]
    ax.plot(mean_p, mean_y, "o-", label="model")
    hi = max(mean_p + mean_y + [0.01])
    ax.plot([0, hi], [0, hi], "k:", lw=0.8)
    ax.set(xlabel="mean predicted CTR (decile)", ylabel="observed CTR", title="Calibration, held-out day")
    paths.append(f"{path_prefix}calibration.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
