"""PNG plots of the kernel benchmark CSV: time vs S per H, and speedup over eager with the roofline percentage.

    python -m bench.plot [CSV] [--out DIR]

Only bench.kernels' rows are plotted. The CSV accumulates runs; at every (device, kernel, dtype, S, H) the latest
run's rows are plotted.
One pair of figures per (device, kernel, dtype).
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .common import DEFAULT_CSV  # noqa: E402

KERNELS = ("sprm_score", "step_scorer_update")  # the rows of bench.kernels
Key = tuple[str, str, str, str, int, int, str]  # device, kernel, provider, dtype, S, H, metric


def latest_rows(path: Path) -> dict[Key, dict]:
    """Every measurement of the latest run at each (device, kernel, dtype, S, H), so that the providers compared
    at one shape always come from the same run (ISO timestamps sort in time order)."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["kernel"] in KERNELS:  # the pipeline benchmark and machine rows share the CSV
                rows.append(row)
    shape = lambda row: (row["device_name"], row["kernel"], row["dtype"], int(row["S"]), int(row["H"]))
    latest_run = {}
    for row in rows:
        latest_run[shape(row)] = max(latest_run.get(shape(row), ""), row["timestamp"])
    return {
        (
            row["device_name"],
            row["kernel"],
            row["provider"],
            row["dtype"],
            int(row["S"]),
            int(row["H"]),
            row["metric"],
        ): row
        for row in rows
        if row["timestamp"] == latest_run[shape(row)]
    }


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def plot_group(rows: dict[Key, dict], device: str, kernel: str, dtype: str, out_dir: Path) -> list[Path]:
    """Two figures for one (device, kernel, dtype): time vs S per H, and speedup / roofline % vs S."""
    series = defaultdict(dict)  # (provider, H, metric) -> {S: row}
    for (dev, ker, provider, dt, rows_, hidden_size, metric), row in rows.items():
        if (dev, ker, dt) == (device, kernel, dtype):
            series[(provider, hidden_size, metric)][rows_] = row
    providers = sorted({p for p, _, _ in series}, key=lambda p: (p != "eager", p))
    hidden_sizes = sorted({h for _, h, _ in series})
    colours = {p: f"C{i}" for i, p in enumerate(providers)}
    title = f"{kernel}, {dtype}, {device}"
    stem = out_dir / f"{kernel}_{dtype}_{slug(device)}"
    x_label = "B (candidates, one row each)" if kernel == "step_scorer_update" else "S (scored rows)"

    fig, axes = plt.subplots(1, len(hidden_sizes), figsize=(4.5 * len(hidden_sizes), 4), squeeze=False)
    for ax, hidden_size in zip(axes[0], hidden_sizes, strict=True):
        for provider in providers:
            points = series.get((provider, hidden_size, "ms"))
            if not points:
                continue
            sizes = sorted(points)
            p50 = [float(points[s]["p50"]) for s in sizes]
            ax.plot(sizes, p50, "o-", color=colours[provider], label=provider)
            low, high = [float(points[s]["p20"]) for s in sizes], [float(points[s]["p80"]) for s in sizes]
            ax.fill_between(sizes, low, high, color=colours[provider], alpha=0.2)
        ax.set(xscale="log", yscale="log", xlabel=x_label, ylabel="ms per call (median, p20-p80 band)")
        ax.set_title(f"H = {hidden_size}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    time_png = stem.with_name(stem.name + "_time.png")
    fig.savefig(time_png, dpi=110)
    plt.close(fig)

    fig, (speed_ax, roof_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for provider in providers:
        for i, hidden_size in enumerate(hidden_sizes):
            style = ["o-", "s--", "^:"][i % 3]
            label = f"{provider}, H={hidden_size}"
            timed = series.get((provider, hidden_size, "ms"), {})
            eager = series.get(("eager", hidden_size, "ms"), {})
            shared = sorted(set(timed) & set(eager))
            if provider != "eager" and shared:
                speedup = [float(eager[s]["p50"]) / float(timed[s]["p50"]) for s in shared]
                speed_ax.plot(shared, speedup, style, color=colours[provider], label=label)
            roof = series.get((provider, hidden_size, "roofline_pct"), {})
            if roof:
                sizes = sorted(roof)
                roof_ax.plot(sizes, [float(roof[s]["p50"]) for s in sizes], style, color=colours[provider], label=label)
    speed_ax.axhline(1.0, color="grey", lw=1)
    speed_ax.set(xscale="log", xlabel=x_label, ylabel="speedup over eager (median times)", title="speedup vs eager")
    roof_ax.set(xscale="log", xlabel=x_label, ylabel="% of the roofline floor (median)", title="roofline")
    for ax in (speed_ax, roof_ax):
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    summary_png = stem.with_name(stem.name + "_speedup_roofline.png")
    fig.savefig(summary_png, dpi=110)
    plt.close(fig)
    return [time_png, summary_png]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="?", default=str(DEFAULT_CSV), help="results CSV (default: %(default)s)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: plots/ beside the CSV)")
    args = parser.parse_args(argv)
    csv_path = Path(args.csv)
    if not csv_path.exists():
        raise SystemExit(f"{csv_path}: no such file; run `python -m bench.kernels` first")
    out_dir = Path(args.out) if args.out else csv_path.parent / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = latest_rows(csv_path)
    groups = sorted({(dev, ker, dt) for dev, ker, _, dt, _, _, _ in rows})
    for device, kernel, dtype in groups:
        for path in plot_group(rows, device, kernel, dtype, out_dir):
            print(path)


if __name__ == "__main__":
    main()
