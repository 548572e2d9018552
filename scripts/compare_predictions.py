#!/usr/bin/env python3
"""Agreement of two `verdict-train eval --predictions` reports on the same examples: how many
predicted labels differ, and the largest and mean absolute difference of the label probabilities;
then, against the gold labels, how many of A's errors B fixes and how many new ones it makes, with
the exact two-sided McNemar p-value of that difference.

    python3 scripts/compare_predictions.py A.json B.json
"""
import json
import sys
from math import comb


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
    right = lambda p: p["predicted"] == p["gold"]
    fixed = sum(not right(a[i]) and right(b[i]) for i in common)
    broken = sum(right(a[i]) and not right(b[i]) for i in common)
    n = fixed + broken
    p = min(1.0, 2 * sum(comb(n, k) for k in range(min(fixed, broken) + 1)) / 2**n) if n else 1.0
    print(f"B fixes {fixed} of A's errors and makes {broken} new ones (exact McNemar p = {p:.2f})")


if __name__ == "__main__":
    main()
