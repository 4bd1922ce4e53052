"""What the data fingerprint costs: version 1 (a float32 copy of 8-bit images) against version 2 (the stored bytes).

Every nas-search, nas-export and nas-compare cell fingerprints its data, so this runs on an array of CIFAR-10's
size (50,000 + 10,000 images of 3x32x32 uint8, random pixels), both versions interleaved, and prints the
median, the range and the ratio.

    python scripts/bench_fingerprint.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from nas.data import Arrays, RawInput, content_sha256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs of each version (default %(default)s)")
    parser.add_argument("--train", type=int, default=50_000, help="training images (default %(default)s)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.train + args.train // 5, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, len(x)).astype(np.int64)
    arrays = Arrays(
        x[: args.train],
        labels[: args.train],
        x[args.train :],
        labels[args.train :],
        [str(c) for c in range(10)],
        raw=RawInput("", "HWC", "uint8", 255.0),
    )
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for version in seconds:
            start = time.perf_counter()
            content_sha256(arrays, version)
            seconds[version].append(time.perf_counter() - start)
    for version, runs in seconds.items():
        print(
            f"fingerprint version {version}: median {statistics.median(runs):.4f} s "
            f"(range {min(runs):.4f}-{max(runs):.4f}, {len(runs)} runs)"
        )
    print(f"version 2 / version 1: {statistics.median(seconds[2]) / statistics.median(seconds[1]):.3f}x")


if __name__ == "__main__":
    main()
