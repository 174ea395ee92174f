"""Paired comparison of two contenders from ``mrisynth evaluate`` outputs, per case, over several pairs.

Why: two training runs of one recipe differ by 1-2 dB on a target (the split and the seed move
them), so a new model is compared with the seed's at the *same* seed and split, case by case, and
the figure that matters is the paired difference pooled over the seeds, with the count of cases
that went each way. This script reads the JSON files that ``mrisynth evaluate --out F`` writes
(one per contender, target and seed) and prints, for each pair and pooled over all of them, the
mean of each metric for both contenders, the mean paired difference and the number of cases where
the first contender is better (higher is better for every metric it accepts but ``mae``).

    python benchmarks/paired.py --pair "seed 0" NEW_seed0.json OLD_seed0.json \\
                                --pair "seed 1" NEW_seed1.json OLD_seed1.json --metric psnr --metric ssim_nontumour

A pair whose two files do not hold the same cases (or lack a metric for one) is refused: a paired
difference over different patients would mean nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

#: metrics where a lower value is better; every other metric of mrisynth evaluate is better higher
LOWER_IS_BETTER = {"mae"}
DEFAULT_METRICS = ("psnr", "ssim_tumour_region", "ssim_nontumour")


class PairingError(ValueError):
    """Two evaluation files that cannot be compared case by case."""


def read_scores(path: Path, metrics: list[str]) -> dict[str, dict[str, float]]:
    """{case: {metric: value}} from one ``mrisynth evaluate --out`` JSON file."""
    try:
        report = json.loads(Path(path).read_text())
        rows = report["cases"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PairingError(f"{path}: expected the JSON file of `mrisynth evaluate --out`, found an unreadable file ({exc})") from None
    scores = {}
    for row in rows if isinstance(rows, list) else [None]:
        if not isinstance(row, dict) or not isinstance(row.get("case"), str):
            raise PairingError(f"{path}: expected per-case rows with a case name, found {str(row)[:60]}")
        missing = [m for m in metrics if _number(row.get(m)) is None]
        if missing:
            raise PairingError(f"{path}: case {row['case']} has no number for {', '.join(missing)}")
        scores[row["case"]] = {m: _number(row[m]) for m in metrics}
    if not scores:
        raise PairingError(f"{path}: expected scored cases, found none")
    return scores


def _number(value: Any) -> float | None:
    """A metric as a float; evaluate writes an infinite PSNR (identical volumes) as the string "inf"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float(value) if value in ("inf", "-inf") else None


def check_same_cases(first: dict, second: dict, names: tuple[Path, Path]) -> None:
    """A paired difference over different patients would mean nothing: refuse it."""
    if set(first) != set(second):
        only = sorted(set(first) ^ set(second))
        raise PairingError(f"{names[0]} and {names[1]}: expected the same cases, found {len(only)} in one only ({', '.join(only[:3])})")


def better(differences: list[float], metric: str) -> int:
    """How many cases the first contender wins (a tie wins for neither)."""
    sign = -1 if metric in LOWER_IS_BETTER else 1
    return sum(sign * d > 0 for d in differences)


def compare(pairs: list[tuple[str, Path, Path]], metrics: list[str]) -> dict[str, Any]:
    """Per pair and pooled: both contenders' means, the mean paired difference, cases better."""
    result: dict[str, Any] = {"pairs": [], "pooled": {}}
    pooled: dict[str, list[float]] = {m: [] for m in metrics}
    for label, first_path, second_path in pairs:
        first, second = read_scores(first_path, metrics), read_scores(second_path, metrics)
        check_same_cases(first, second, (first_path, second_path))
        row: dict[str, Any] = {"label": label, "first": str(first_path), "second": str(second_path), "metrics": {}}
        for metric in metrics:
            diffs = [first[case][metric] - second[case][metric] for case in sorted(first)]
            pooled[metric] += diffs
            row["metrics"][metric] = {
                "first": statistics.mean(s[metric] for s in first.values()),
                "second": statistics.mean(s[metric] for s in second.values()),
                "difference": statistics.mean(diffs), "better": better(diffs, metric), "n": len(diffs)}
        result["pairs"].append(row)
    for metric, diffs in pooled.items():
        per_pair = [p["metrics"][metric]["difference"] for p in result["pairs"]]
        worst = max(per_pair) if metric in LOWER_IS_BETTER else min(per_pair)
        result["pooled"][metric] = {"difference": statistics.mean(diffs), "better": better(diffs, metric),
                                    "n": len(diffs), "worst_pair": worst}
    return result


def format_table(result: dict[str, Any], metrics: list[str]) -> str:
    """Markdown: one row per pair, then the pooled row."""
    header = "| pair | " + " | ".join(f"{m}: first / second / difference (better)" for m in metrics) + " |"
    lines = [header, "|---|" + "---:|" * len(metrics)]
    for pair in result["pairs"]:
        cells = [f"{c['first']:.4f} / {c['second']:.4f} / {c['difference']:+.4f} ({c['better']}/{c['n']})"
                 for c in (pair["metrics"][m] for m in metrics)]
        lines.append(f"| {pair['label']} | " + " | ".join(cells) + " |")
    cells = [f"{p['difference']:+.4f} ({p['better']}/{p['n']}), worst pair {p['worst_pair']:+.4f}"
             for p in (result["pooled"][m] for m in metrics)]
    lines.append("| **pooled** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LABEL", "FIRST.json", "SECOND.json"),
                        help="a label and two `mrisynth evaluate --out` files: FIRST minus SECOND, per case")
    parser.add_argument("--metric", action="append", help=f"a per-case metric of mrisynth evaluate (default: {', '.join(DEFAULT_METRICS)})")
    parser.add_argument("--out", type=Path, help="JSON with every figure")
    args = parser.parse_args(argv)
    metrics = args.metric or list(DEFAULT_METRICS)
    pairs = [(label, Path(a), Path(b)) for label, a, b in args.pair]
    try:
        result = compare(pairs, metrics)
    except PairingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(result, metrics))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
