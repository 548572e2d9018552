#!/usr/bin/env python3
"""Summaries of a training run's metrics.jsonl (verdict-train sft / ppo / reward-model).

Usage: scripts/run_stats.py METRICS.jsonl [KEY ...]
Prints the median step time, then for each KEY (default: the PPO curves) its values step by
step with their minimum, median and maximum, and the dev scores.
"""
import json
import statistics
import sys

path, keys = sys.argv[1], sys.argv[2:]
rows = [json.loads(line) for line in open(path)]
steps = [r for r in rows if "step_seconds" in r]
print(f"{path}: {len(steps)} steps, median step {statistics.median(r['step_seconds'] for r in steps):.1f} s")
if not keys:
    keys = [k for k in ("accuracy", "kl", "entropy", "clipfrac", "value_loss") if any(k in r for r in steps)]
for k in keys:
    vals = [r[k] for r in steps if r.get(k) is not None]
    if vals:
        shown = ", ".join(f"{v:.3g}" for v in vals)
        print(f"{k}: min {min(vals):.3g}, median {statistics.median(vals):.3g}, max {max(vals):.3g} ({shown})")
dev = [(r["step"], r["dev_score"]) for r in rows if "dev_score" in r]
if dev:
    print("dev: " + ", ".join(f"step {s}: {v:.3f}" for s, v in dev))
