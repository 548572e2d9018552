#!/usr/bin/env python3
"""Agreement of two `verdict-train eval --predictions` reports on the same examples: how many
predicted labels differ, and the largest and mean absolute difference of the label probabilities.

    python3 scripts/compare_predictions.py A.json B.json
"""
import json
import sys


def predictions(path):
    report = json.load(open(path))
    return {p["id"]: p for task in report["tasks"] for p in task["predictions"]}


def main():
    a, b = predictions(sys.argv[1]), predictions(sys.argv[2])
    common = sorted(set(a) & set(b))
    if not common:
        sys.exit("no examples in common")
    flips = sum(a[i]["predicted"] != b[i]["predicted"] for i in common)
    diffs = [abs(x - y) for i in common for x, y in zip(a[i]["probs"], b[i]["probs"])]
    print(f"{len(common)} examples: {flips} predictions differ; label probabilities differ by at most "
          f"{max(diffs):.2e}, {sum(diffs) / len(diffs):.2e} on average")


if __name__ == "__main__":
    main()
