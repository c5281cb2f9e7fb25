"""Time and memory of `protocols.knn.knn_classify` on ImageNet-sized random banks.

Each bank size runs in its own child process, so every peak-memory figure belongs to one size.
The bank is random float32 (N x D) with random labels; by default it lives in a memmap file on
disk, as the feature cache holds it in `protocols.knn.run`, so "peak anon" shows what the search
itself allocates. `--storage ram` keeps the bank in RAM instead (then add N*D*4 bytes).

    python benchmarks/knn.py                          # 100k, 500k and 1.28M x 2048, 10k queries
    python benchmarks/knn.py --sizes 100000 --queries 2000 --storage ram
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

IMAGENET_TRAIN = 1281167


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 500_000, IMAGENET_TRAIN],
                        help="bank rows, one run per value (default: 100000 500000 1281167)")
    parser.add_argument("--queries", type=int, default=10_000, help="query rows (default 10000)")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension (default 2048, ResNet-50 res5)")
    parser.add_argument("--classes", type=int, default=1000, help="number of random labels (default 1000)")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200],
                        help="k values (default 10 20 100 200)")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--bank-chunk-rows", type=int, default=32768, help="bank rows normalised and searched at once")
    parser.add_argument("--query-chunk-rows", type=int, default=65536, help="queries searched at once")
    parser.add_argument("--storage", choices=("disk", "ram"), default="disk",
                        help="bank in a memmap file (like the feature cache) or in RAM (default disk)")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="folder for the memmap bank (deleted afterwards)")
    parser.add_argument("--threads", type=int, default=0, help="FAISS/OpenMP threads (0: FAISS default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakAnonymousMemory(threading.Thread):
    """Samples RssAnon (memory the process allocated, not file pages it mapped) every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib = status_kib("RssAnon")
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))


def random_rows(rows: int, dim: int, rng: np.random.Generator, out: np.ndarray, chunk: int = 65536) -> np.ndarray:
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        out[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    return out


def gib(kib: float) -> float:
    return kib / 2**20


def measure(args: argparse.Namespace, size: int) -> dict:
    """One timed `knn_classify` on a random bank of `size` rows, in this process: the figures as a dict."""
    import faiss

    from protocols.knn import knn_classify

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    path = None
    if args.storage == "disk":
        fd, path = tempfile.mkstemp(suffix=".npy", dir=args.tmp)
        os.close(fd)
        bank = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(size, args.dim))
        random_rows(size, args.dim, rng, bank)
        bank.flush()
        del bank
        bank = np.load(path, mmap_mode="r")
    else:
        bank = random_rows(size, args.dim, rng, np.empty((size, args.dim), dtype=np.float32))
    bank_labels = rng.integers(0, args.classes, size)
    queries = random_rows(args.queries, args.dim, rng, np.empty((args.queries, args.dim), dtype=np.float32))
    query_labels = rng.integers(0, args.classes, args.queries)
    make_seconds = time.perf_counter() - start
    try:
        monitor = PeakAnonymousMemory()
        before_kib = status_kib("RssAnon")
        monitor.start()
        start = time.perf_counter()
        metrics = knn_classify(bank, bank_labels, queries, query_labels, ks=args.ks, temperature=args.temperature,
                               num_classes=args.classes, bank_chunk_rows=args.bank_chunk_rows,
                               query_chunk_rows=args.query_chunk_rows)
        seconds = time.perf_counter() - start
        monitor.stop.set()
        monitor.join()
    finally:
        if path:
            os.unlink(path)
    return {"size": size, "dim": args.dim, "storage": args.storage, "queries": args.queries, "seconds": seconds,
            "gflop": 2.0 * size * args.queries * args.dim / 1e9, "make_seconds": make_seconds,
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "peak_anon_kib": monitor.peak_kib,
            "before_kib": before_kib, "k": min(args.ks), "top1": metrics[f"top1@k={min(args.ks)}"],
            "classes": args.classes}


def measure_one(args: argparse.Namespace, size: int) -> None:
    r = measure(args, size)
    seconds = r["seconds"]
    print(
        f"bank {size:>9,} x {r['dim']} ({size * r['dim'] * 4 / 2**30:5.2f} GiB, {r['storage']}) | "
        f"{r['queries']:,} queries | k-NN {seconds:8.1f} s ({r['gflop'] / seconds:6.1f} GFLOP/s, "
        f"{seconds / r['queries'] * 1e3:6.2f} ms/query) | peak RSS {gib(r['peak_rss_kib']):5.2f} GiB | "
        f"peak anon {gib(r['peak_anon_kib']):5.2f} GiB (+{gib(r['peak_anon_kib'] - r['before_kib']):4.2f} during "
        f"k-NN) | setup {r['make_seconds']:.0f} s | top1@k={r['k']} {r['top1']:.2f} (chance {100 / r['classes']:.2f})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        measure_one(args, args.sizes[0])
        return
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for size in args.sizes:
        script = str(Path(__file__).resolve())
        child = [sys.executable, script, *strip_sizes(passthrough), "--sizes", str(size), "--child"]
        result = subprocess.run(child, check=False)
        if result.returncode != 0:
            print(f"bank {size:,}: failed with exit status {result.returncode}", flush=True)


def strip_sizes(argv: list[str]) -> list[str]:
    """argv without `--sizes a b c` (the parent hands each child one size)."""
    out, skipping = [], False
    for arg in argv:
        if arg == "--sizes" or arg.startswith("--sizes="):
            skipping = arg == "--sizes"
            continue
        if skipping and not arg.startswith("--"):
            continue
        skipping = False
        out.append(arg)
    return out


if __name__ == "__main__":
    main()
