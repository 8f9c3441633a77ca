"""Paired differences between two runs of ``benchmarks/recover_size.py`` on the same model (e.g. before and
after a change to the recovery): for every scorer x budget and size setting found in both, the mean over
seeds of each and the difference on the same test examples with its 95% CI.

    python benchmarks/paired_cells.py benchmarks/runs/rowsplit/recover_size-vgg-fmnist.cells.json \\
        benchmarks/runs/recover_size-vgg-fmnist.cells.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from optin import stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    args = ap.parse_args()
    old, new = (json.load(open(p)) for p in (args.before, args.after))
    counts = stats.resample_counts(len(old["unpruned"]))
    cells = sorted({k.rsplit("|", 1)[0] for k in new["cells"]} & {k.rsplit("|", 1)[0] for k in old["cells"]})
    for cell in cells:
        seeds = sorted({k.rsplit("|", 1)[1] for k in new["cells"] if k.startswith(cell + "|")})
        for size in new["cells"][f"{cell}|{seeds[0]}"]["sizes"]:
            try:
                a = np.asarray([old["cells"][f"{cell}|{s}"]["sizes"][size]["results"] for s in seeds])
                b = np.asarray([new["cells"][f"{cell}|{s}"]["sizes"][size]["results"] for s in seeds])
            except KeyError:
                continue
            d = stats.paired_difference(b, a, counts)
            print(f"{cell} {size}: {a.mean():.4f} -> {b.mean():.4f}, {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]")


if __name__ == "__main__":
    main()
