"""Throughput of pike-prep's byte-tokenizer path, in MB of input text per second.

Builds ~--mb MB of real text (the .py sources of the installed packages, sorted, dealt
round-robin into 4 domains as JSONL), then times prepare() with 1 and with 2 workers.
Prints a summary, then a final line that is a JSON object:

    {"mb_per_s": ..., "mb_per_s_2_workers": ..., "mb_per_cpu_s": ..., "mb": ..., "cores": ...}

mb_per_s values are wall-clock; mb_per_cpu_s (1 worker, MB per CPU-second) does not depend on
what else the machine is running.

    python benchmarks/prep_throughput.py [--mb 64] [--raw-dir DIR] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sysconfig
import tempfile
import time
from pathlib import Path

from streaming_prep import prepare

MB = 1 << 20
N_DOMAINS = 4


def write_corpus(raw_dir: str, target_bytes: int) -> dict[str, str]:
    """Deal sorted site-packages .py files into N_DOMAINS JSONL files until target_bytes of text."""
    paths = {f"code{i}": os.path.join(raw_dir, f"code{i}.jsonl") for i in range(N_DOMAINS)}
    if all(os.path.exists(path) for path in paths.values()):
        return paths  # reuse an earlier run's corpus
    files = [open(path, "w", encoding="utf-8") for path in paths.values()]
    written = 0
    for index, path in enumerate(sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py"))):
        if written >= target_bytes:
            break
        text = path.read_text("utf-8", errors="replace")
        files[index % N_DOMAINS].write(json.dumps({"text": text}) + "\n")
        written += len(text.encode("utf-8"))
    for f in files:
        f.close()
    return paths


def cpu_seconds() -> float:
    """CPU time used so far by this process and its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_prepare(domains: dict[str, str], out: str, workers: int, seq_len: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, input text bytes) for one prepare() run."""
    start, start_cpu = time.perf_counter(), cpu_seconds()
    manifest = prepare(domains, out, seq_len=seq_len, workers=workers, progress=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    return seconds, cpu, sum(domain["bytes"] for domain in manifest["domains"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=64, help="MB of input text to generate")
    parser.add_argument("--raw-dir", help="where the JSONL corpus is (re)used (default: a temporary directory)")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pike-bench-") as scratch:
        raw_dir = args.raw_dir or os.path.join(scratch, "raw")
        os.makedirs(raw_dir, exist_ok=True)
        domains = write_corpus(raw_dir, int(args.mb * MB))
        one_s, one_cpu, text_bytes = time_prepare(domains, os.path.join(scratch, "out1"), 1, args.seq_len)
        two_s, two_cpu, _ = time_prepare(domains, os.path.join(scratch, "out2"), 2, args.seq_len)

    mb = text_bytes / MB
    result = {
        "mb_per_s": round(mb / one_s, 2),
        "mb_per_s_2_workers": round(mb / two_s, 2),
        "mb_per_cpu_s": round(mb / one_cpu, 2),
        "mb": round(mb, 2),
        "cores": os.cpu_count(),
    }
    print(f"input: {mb:.1f} MB of text in {N_DOMAINS} domains, byte tokenizer, seq_len {args.seq_len}, zstd + xxh64")
    print(f"1 worker:  {one_s:.2f} s wall, {one_cpu:.2f} s CPU  ({result['mb_per_s']} MB/s)")
    print(f"2 workers: {two_s:.2f} s wall, {two_cpu:.2f} s CPU  ({result['mb_per_s_2_workers']} MB/s)")
    print(f"load average (1 min) after the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
