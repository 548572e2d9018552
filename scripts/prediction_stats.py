#!/usr/bin/env python3
"""Confusion matrix, mean label probabilities and (binary tasks) ROC AUC of the positive class,
from `verdict-train eval --predictions --out report.json` reports (constrained mode).

Usage: python3 scripts/prediction_stats.py report.json [...]
"""
import json
import sys
from collections import Counter


def roc_auc(pos, neg):
    # Probability that a random positive outranks a random negative (ties count half).
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        avg_rank = (i + j + 1) / 2  # 1-based average rank of the tie block
        rank_sum += avg_rank * sum(1 for k in range(i, j) if ranked[k][1] == 1)
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


for path in sys.argv[1:]:
    report = json.load(open(path))
    for t in report["tasks"]:
        preds = [p for p in t["predictions"] if p.get("probs")]
        if not preds:
            print(f"{path}: {t['task']}: no constrained predictions in the report (use --predictions)")
            continue
        n_classes = len(preds[0]["probs"])
        confusion = Counter((p["gold"]["class"], p["predicted"]["class"]) for p in preds)
        print(f"{path}: {t['task']} ({report['model']}, {t['shots']}-shot), n = {len(preds)}")
        print("  confusion (gold -> predicted): " + ", ".join(f"{g}->{q}: {c}" for (g, q), c in sorted(confusion.items())))
        means = [sum(p["probs"][k] for p in preds) / len(preds) for k in range(n_classes)]
        print("  mean probability per label: " + ", ".join(f"{m:.3f}" for m in means))
        if n_classes == 2:
            pos = [p["probs"][1] for p in preds if p["gold"]["class"] == 1]
            neg = [p["probs"][1] for p in preds if p["gold"]["class"] == 0]
            print(f"  ROC AUC of P(class 1): {roc_auc(pos, neg):.4f}")
