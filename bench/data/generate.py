#!/usr/bin/env python3
"""Writes the synthetic sequence-length distributions of bench/data/, one length per line.

Fixed seeds, the standard library only, so the same files come out on any machine:
    python3 bench/data/generate.py            # writes the three files beside this script
    python3 bench/data/generate.py --stats    # prints their statistics (the table in README.md)
"""
import argparse
import math
import pathlib
import random

HERE = pathlib.Path(__file__).resolve().parent
MIN_LENGTH, MAX_LENGTH = 128, 1 << 20


def clip(length):
    return max(MIN_LENGTH, min(MAX_LENGTH, int(round(length))))


def lognormal_long_tail(rng):
    # Most documents a few thousand tokens, a tail to a million: median 4096, sigma 1.4.
    return [clip(rng.lognormvariate(math.log(4096), 1.4)) for _ in range(4000)]


def bimodal_mix(rng):
    # Three short sequences (around 2k, chat turns, code files) for every long one (around 64k, books).
    lengths = []
    for _ in range(2000):
        if rng.random() < 0.75:
            lengths.append(clip(rng.gauss(2048, 512)))
        else:
            lengths.append(clip(rng.gauss(65536, 16384)))
    return lengths


def giant_and_short(rng):
    # One sequence of 2M tokens (a whole code base or a book series) among 8000 short ones.
    lengths = [clip(rng.lognormvariate(math.log(2048), 0.8)) for _ in range(8000)]
    lengths.insert(rng.randrange(len(lengths) + 1), 2 << 20)
    return lengths


DISTRIBUTIONS = {
    "lognormal_long_tail.txt": (lognormal_long_tail, 14),
    "bimodal_mix.txt": (bimodal_mix, 15),
    "giant_and_short.txt": (giant_and_short, 16),
}


def stats(lengths):
    s = sorted(lengths)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]
    return (f"{len(s)} sequences, {sum(s):,} tokens; min {s[0]:,}, median {pick(0.5):,}, "
            f"mean {sum(s) // len(s):,}, p99 {pick(0.99):,}, max {s[-1]:,}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", action="store_true", help="print the statistics of the files instead of writing them")
    args = parser.parse_args()
    for name, (make, seed) in DISTRIBUTIONS.items():
        lengths = make(random.Random(seed))
        if args.stats:
            print(f"{name}: {stats(lengths)}")
        else:
            (HERE / name).write_text("".join(f"{l}\n" for l in lengths))


if __name__ == "__main__":
    main()
