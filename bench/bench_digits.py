#!/usr/bin/env python
"""distbp's training service on digits beside scikit-learn's MLPClassifier, same network and optimizer.

Both train an MLP 64-128-10 (ReLU) on the same 80/20 split of scikit-learn's digits with SGD (momentum
0.9, lr 0.1, batch 32) for the same number of epochs, one BLAS thread each; distbp's learning rate follows
its default cosine schedule, scikit-learn's stays constant (its 'constant' learning_rate); each is timed from the start
of training to the end (data already in memory), over several seeds, interleaved. Printed: test
accuracy and wall time of each, and the ratios.

    python bench/bench_digits.py [--quick] [--json PATH]
"""

import argparse
import json
import statistics
import time
import warnings

from threadpoolctl import threadpool_limits

from distbp.data import load_digits
from distbp.train import Trainer, make_config

EPOCHS, BATCH, LR, HIDDEN = 20, 32, 0.1, 128


def run_distbp(seed):
    config = make_config({"epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "hidden": [HIDDEN], "optimizer": "sgd",
                          "momentum": 0.9, "seed": seed, "progress": "none", "schedule": "cosine"})
    trainer = Trainer(config)
    start = time.perf_counter()
    summary = trainer.fit()
    return summary["test_accuracy"], time.perf_counter() - start


def run_sklearn(seed, split):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=(HIDDEN,), activation="relu", solver="sgd", learning_rate_init=LR,
                          momentum=0.9, nesterovs_momentum=False, batch_size=BATCH, max_iter=EPOCHS, alpha=0.0,
                          shuffle=True, random_state=seed, tol=0.0, n_iter_no_change=EPOCHS + 1)
    x, y = split.train.x, split.train.y
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    seconds = time.perf_counter() - start
    return float((model.predict(split.test.x) == split.test.y).mean()), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed (a smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1, 2, 3, 4]
    split = load_digits()
    results = {"distbp": [], "sklearn": []}
    with threadpool_limits(1):
        for seed in seeds:  # interleaved, so that machine noise hits both alike
            results["distbp"].append(run_distbp(seed))
            results["sklearn"].append(run_sklearn(seed, split))
    print(f"digits: {len(split.train)} train / {len(split.test)} test; MLP 64-{HIDDEN}-10, SGD momentum 0.9, "
          f"lr {LR}, batch {BATCH}, {EPOCHS} epochs, {len(seeds)} seed(s), 1 BLAS thread")
    print(f"{'':10s} {'test accuracy (median, min..max)':>34s} {'seconds (median)':>18s}")
    summary = {}
    for name, rows in results.items():
        acc = [a for a, _ in rows]
        secs = [s for _, s in rows]
        summary[name] = {"accuracy": statistics.median(acc), "seconds": statistics.median(secs)}
        print(f"{name:10s} {statistics.median(acc):>20.2%} ({min(acc):.2%}..{max(acc):.2%}) "
              f"{statistics.median(secs):>12.3f}")
    time_ratio = summary["distbp"]["seconds"] / summary["sklearn"]["seconds"]
    acc_gain = summary["distbp"]["accuracy"] - summary["sklearn"]["accuracy"]
    ok = time_ratio < 1 and acc_gain >= 0
    print(f"distbp / sklearn wall time: {time_ratio:.2f} (target < 1); accuracy difference {acc_gain:+.2%} "
          f"(target >= 0)   {'PASS' if ok else 'MISS'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "time_ratio": time_ratio, "accuracy_difference": acc_gain,
                       "runs": results}, fh, indent=2)


if __name__ == "__main__":
    main()
