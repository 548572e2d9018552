#!/usr/bin/env python3
"""Print a Markdown table from `verdict-train eval --out` reports.

Usage: python3 scripts/results_table.py docs/results/mr-*.json
One row per (report, task, metric): model, weights, shots, mode, n, value, 95% CI,
unparseable rate, examples/s, wall seconds.
"""
import json
import sys


def main(paths):
    print("| model | weights | task | shots | mode | n | metric | value | 95% CI | unparseable | examples/s | seconds |")
    print("|---|---|---|---:|---|---:|---|---:|---|---:|---:|---:|")
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        for t in report["tasks"]:
            for m in t["score"]["metrics"]:
                unparseable = t["unparseable"] / t["examples"]
                print(
                    f"| {report['model']} | {report['weights']} | {t['task']} | {t['shots']} | {t['mode']} | {t['examples']} "
                    f"| {m['metric']} | {m['value']:.4f} | [{m['ci_low']:.4f}, {m['ci_high']:.4f}] "
                    f"| {unparseable:.1%} | {t['examples_per_second']:.2f} | {t['seconds']:.0f} |"
                )


if __name__ == "__main__":
    main(sys.argv[1:])
