"""Quality against CPU time per volume, one point per contender: the picture a user chooses a tool by.

Reads the JSON written by ``quality.py`` (y: brain PSNR and BraSyn non-tumour SSIM, mean ± sd over
the held-out cases) and, when given, the JSON of ``speed.py`` (x: median end-to-end CPU seconds
to synthesize one 240x240x155 case, every contender timed in that one run). Without a speed JSON,
x is the median end-to-end time per case measured during the quality run itself. Points are
matched by contender id (``copy``, ``voxel-regression``, ``vae_unet:fixed``, ``lite_vae_unet:any``);
a contender missing from the speed run is left out, with a note.

    .venv/bin/python benchmarks/plot_tradeoff.py [--quality docs/results/quality-flair-DATE.json]
        [--speed docs/results/speed-DATE.json] [--out docs/img/quality_vs_speed.png]

Given neither file, the most recently written ``docs/results/quality-*.json`` and ``speed-*.json``
are used, so ``make bench`` can draw the figure after publishing both.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _common import DEFAULT_DATA, PUBLISH_DIR, REPO_ROOT, refuse_inside

DEFAULT_OUT = REPO_ROOT / "docs" / "img" / "quality_vs_speed.png"
ONNX_SUFFIX = "+onnx"  # speed.py's id of a network run with --engine onnx
PANELS = (("psnr", "PSNR, brain only (dB)"), ("ssim_nontumour", "SSIM non-tumour (BraSyn protocol)"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quality", type=Path, default=None,
                   help="quality.json or a published quality-*.json (default: the newest in docs/results)")
    p.add_argument("--speed", type=Path, default=None,
                   help="speed.json or a published speed-*.json (default: when --quality is not given either, the "
                        "newest in docs/results; otherwise, or when there is none, x comes from the quality run)")
    p.add_argument("--target", default=None, help="which target's scores to plot (default: flair, else the first in the quality JSON)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write (default docs/img/quality_vs_speed.png)")
    return p.parse_args(argv)


def newest(pattern: str) -> Path | None:
    """The most recently written published result matching ``pattern``, if any."""
    found = sorted(PUBLISH_DIR.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        sys.exit(f"{path}: file not found")
    return json.loads(path.read_text())


def points(quality: dict, speed: dict | None, target: str) -> list[dict[str, Any]]:
    """One point per contender: label, x (s/volume) and mean/sd of each panel's metric."""
    chosen = []
    for entry in quality["contenders"]:
        result = entry["targets"].get(target)
        if result is None:
            continue
        if speed is not None:
            timed = speed["synthesis"].get(entry["id"], {})
            x = timed.get("median_total_s")
        else:
            x = result["timing_median_s"]["total_s"]
        if x is None:
            print(f"note: no CPU time for {entry['id']} in the {'speed' if speed else 'quality'} run: left out", file=sys.stderr)
            continue
        summary = result["summary"]
        chosen.append({"label": entry["label"], "x": x, **{k: summary.get(k, {}) for k, _ in PANELS}})
        onnx = (speed or {}).get("synthesis", {}).get(entry["id"] + ONNX_SUFFIX, {})
        if onnx.get("median_total_s") is not None:  # the same synthesis (to 1e-5) run by ONNX Runtime
            chosen.append({"label": entry["label"] + ", ONNX Runtime", "x": onnx["median_total_s"],
                           **{k: summary.get(k, {}) for k, _ in PANELS}})
    return chosen


def plot(chosen: list[dict[str, Any]], title: str, x_label: str, out: Path) -> Path:
    """Two panels side by side, log time axis, error bars = sd over cases, one legend below."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5.2), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    markers = "osD^vP*X"
    for ax, (key, y_label) in zip(axes, PANELS):
        for i, point in enumerate(chosen):
            stats = point[key]
            if stats.get("mean") is None:
                continue
            sd = stats.get("sd") if isinstance(stats.get("sd"), (int, float)) else 0.0
            ax.errorbar(point["x"], stats["mean"], yerr=sd, fmt=markers[i % len(markers)], color=f"C{i}", capsize=3,
                        markersize=7, label=point["label"])
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refuse_inside(args.out, DEFAULT_DATA, "--out")
    quality_path = args.quality or newest("quality-*.json")
    if quality_path is None:
        sys.exit(f"no --quality given and no quality-*.json in {PUBLISH_DIR}: run benchmarks/quality.py --publish first")
    speed_path = args.speed or (newest("speed-*.json") if args.quality is None else None)
    print(f"quality: {quality_path}; speed: {speed_path or 'none (times from the quality run)'}")
    quality = load(quality_path)
    speed = load(speed_path) if speed_path else None
    target = args.target or ("flair" if "flair" in quality["targets"] else quality["targets"][0])
    if target not in quality["targets"]:
        sys.exit(f"--target {target}: the quality run has {', '.join(quality['targets'])}")
    chosen = points(quality, speed, target)
    if not chosen:
        sys.exit("nothing to plot: no contender has both scores and a time")
    source = speed or quality
    x_label = "CPU seconds per 240×240×155 volume (log scale)"
    timing = ("times: end to end, median of speed.py's runs on one case" if speed else
              "times: end to end, median over the test cases of the quality run")
    n_cases = len(quality["split"]["test"])
    title = (f"Synthesizing {target.upper()}: quality = mean ± sd over {n_cases} held-out BraTS cases; {timing}\n"
             f"{source['machine']['cpu_model']}, {source['machine']['torch_threads']} threads; "
             f"quality: commit {quality['commit']['commit']}" + (f", speed: commit {speed['commit']['commit']}" if speed else ""))
    print(plot(chosen, title, x_label, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
