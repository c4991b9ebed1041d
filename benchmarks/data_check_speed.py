"""Speed of ``medtune.data.quality.check`` against a brute-force all-pairs Jaccard baseline.

Train is the CMExam sample (999 valid rows); test is 999 rows made from it: 5% exact copies, 5%
with one character changed (near duplicates), the rest with 30% of their characters replaced
(distinct questions). Both methods get the same normalised texts; brute force compares every pair
of distinct texts with the exact 3-gram Jaccard similarity (its 3-gram sets are built outside the
timed region, which favours it). The two must find the same pairs.

``--scale N`` also times ``check`` on N × N synthetic rows (the sample, mutated) and extrapolates
brute force from its measured pairs/second (``--brute-at-scale`` runs it instead: minutes).

    .venv/bin/python benchmarks/data_check_speed.py [--threshold 0.9] [--scale 7000]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import time


def mutate(text: str, share: float, alphabet: list[str], rng: random.Random) -> str:
    chars = list(text)
    for i in rng.sample(range(len(chars)), max(1, round(share * len(chars)))):
        chars[i] = rng.choice(alphabet)
    return "".join(chars)


def variants(records, n: int, prefix: str, rng: random.Random, alphabet: list[str], mix: bool):
    out = []
    for k in range(n):
        rec = records[k % len(records)]
        roll = rng.random() if mix else 1.0
        if roll < 0.05:
            question = rec.question  # exact copy (leak)
        elif roll < 0.10:
            question = mutate(rec.question, 0.0, alphabet, rng)  # one character changed
        else:
            question = mutate(rec.question, 0.3, alphabet, rng)
        options = {key: mutate(v, 0.3, alphabet, rng) if roll >= 0.10 else v for key, v in rec.options.items()}
        out.append(dataclasses.replace(rec, id=f"{prefix}-{k:05d}", question=question, options=options))
    return out


def brute_force(keys: list[str], threshold: float) -> tuple[list[tuple[int, int, float]], float, int]:
    from medtune.data.quality import jaccard, shingles

    grams = [shingles(k) for k in keys]
    started = time.perf_counter()
    pairs = []
    n_pairs = 0
    for i, j in itertools.combinations(range(len(keys)), 2):
        n_pairs += 1
        similarity = jaccard(grams[i], grams[j])
        if similarity >= threshold - 1e-9:
            pairs.append((i, j, similarity))
    return pairs, time.perf_counter() - started, n_pairs


def distinct_keys(train, test) -> list[str]:
    from medtune.data.quality import _dedup_text

    return list(dict.fromkeys(k for k in (_dedup_text(r) for r in [*train, *test]) if k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--scale", type=int, default=7000, help="rows per split for the large run (0: skip)")
    ap.add_argument("--brute-at-scale", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from medtune.data.cmexam import read_cmexam
    from medtune.data.quality import check, near_duplicate_pairs, normalise_text
    from medtune.quickstart import sample_path

    normalise_text("warm up")  # builds the deletion table once, outside every timing
    rng = random.Random(args.seed)
    train = read_cmexam(sample_path(), on_invalid="skip").records
    alphabet = sorted({ch for r in train for ch in r.question if "\u4e00" <= ch <= "\u9fff"})
    test = variants(train, len(train), "test", rng, alphabet, mix=True)

    started = time.perf_counter()
    report = check(train, test=test, near_threshold=args.threshold)
    t_check = time.perf_counter() - started
    keys = distinct_keys(train, test)
    started = time.perf_counter()
    fast = near_duplicate_pairs(keys, args.threshold)
    t_join = time.perf_counter() - started
    slow, t_brute, n_pairs = brute_force(keys, args.threshold)
    same = sorted((i, j) for i, j, _ in fast) == sorted((i, j) for i, j, _ in slow)

    print(f"{len(train)} train x {len(test)} test CMExam rows, threshold {args.threshold}")
    print(f"  check() end to end:          {t_check:8.3f} s   counts: exact_across={report['counts']['exact_across']} "
          f"near_across={report['counts']['near_across']} test_in_train={report['counts']['test_in_train']}")
    print(f"  prefix-filter join only:     {t_join:8.3f} s   ({len(keys)} distinct texts, {len(fast)} pairs)")
    print(f"  brute force all pairs:       {t_brute:8.3f} s   ({n_pairs:,} pairs, {len(slow)} >= threshold)")
    print(f"  same pairs found: {same}")
    print(f"  ratio brute / join:  {t_brute / t_join:6.1f}x")
    print(f"  ratio brute / check: {t_brute / t_check:6.1f}x")
    if not same:
        raise SystemExit("MISMATCH between the prefix-filter join and brute force")

    if args.scale:
        big_train = variants(train, args.scale, "train", rng, alphabet, mix=False)
        big_test = variants(big_train, args.scale, "test", rng, alphabet, mix=True)
        started = time.perf_counter()
        big = check(big_train, test=big_test, near_threshold=args.threshold)
        t_big = time.perf_counter() - started
        keys = distinct_keys(big_train, big_test)
        n_big = len(keys) * (len(keys) - 1) // 2
        print(f"{args.scale} train x {args.scale} test synthetic rows ({len(keys)} distinct texts)")
        print(f"  check() end to end:          {t_big:8.3f} s   test_in_train={big['counts']['test_in_train']}")
        if args.brute_at_scale:
            _, t_brute_big, _ = brute_force(keys, args.threshold)
            print(f"  brute force all pairs:       {t_brute_big:8.3f} s   ratio {t_brute_big / t_big:.1f}x")
        else:
            estimate = n_big / (n_pairs / t_brute)
            print(f"  brute force (extrapolated):  {estimate:8.1f} s   ({n_big:,} pairs)   ratio ~{estimate / t_big:.0f}x")


if __name__ == "__main__":
    main()
