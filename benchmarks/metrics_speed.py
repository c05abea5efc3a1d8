"""Why two metrics stay hand-written: ROC AUC and Harrell's C-index inside the bootstrap, ours vs the libraries.

Every reported AUC / C-index carries a 95% percentile bootstrap interval (dagman.tasks.metrics.bootstrap_ci: 1000
stratified resamples, the metric called on each), and the method comparison computes hundreds of them. This times
one interval on N rows with our function and with the library's (sklearn.metrics.roc_auc_score,
lifelines.utils.concordance_index), interleaved over --rounds rounds, and checks that both give the same values.

    python benchmarks/metrics_speed.py [--n 300] [--boot 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    from lifelines.utils import concordance_index as lifelines_c
    from sklearn.metrics import roc_auc_score

    from dagman.sysinfo import describe_machine
    from dagman.tasks.metrics import bootstrap_ci, concordance_index, roc_auc

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--boot", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    y = (rng.random(args.n) < 0.4).astype(np.int64)
    s = rng.random(args.n) + 0.3 * y
    t, e = rng.exponential(5.0, args.n), (rng.random(args.n) < 0.7).astype(np.int64)
    cases = {
        "AUC": ((y, s), roc_auc, lambda a, b: float(roc_auc_score(a, b)), y),
        "C-index": ((t, e, s), concordance_index, lambda a, b, c: float(lifelines_c(a, -c, b)), e),
    }
    print(f"machine: {describe_machine()}")
    print(f"one 95% bootstrap interval ({args.boot} stratified resamples) on {args.n} rows; median of "
          f"{args.rounds} interleaved rounds")
    for name, (data, ours, lib, strata) in cases.items():
        assert abs(ours(*data) - lib(*data)) < 1e-12, name
        times = {"dagman": [], "library": []}
        for _ in range(args.rounds):
            for key, fn in (("dagman", ours), ("library", lib)):
                t0 = time.perf_counter()
                ci = bootstrap_ci(fn, *data, n_boot=args.boot, seed=0, stratify=strata)
                times[key].append(time.perf_counter() - t0)
                if key == "dagman":
                    ref = ci
                else:
                    assert np.allclose(ci, ref, atol=1e-12), (name, ci, ref)
        a, b = np.median(times["dagman"]), np.median(times["library"])
        print(f"{name:8s} dagman {a:.3f} s   library {b:.3f} s   library / dagman {b / a:.1f}x   (same interval)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
