"""What provenance.json's model fingerprint costs: core.file_sha256 (the full sha256 of a local model folder's
config, tokenizer and weight files) over a file of --gb GB, read twice: from the page cache (the weights a run
has just loaded) and, where the page cache can be dropped (root on Linux), from the disk.

    python bench/hash_cost.py --gb 2
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402
from bench.header import print_header  # noqa: E402


def timed_sha256(path):
    started = time.time()
    core.file_sha256(path)
    return time.time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="size of the file hashed")
    args = parser.parse_args()
    print_header("The cost of provenance.json's model fingerprint: core.file_sha256 over a file")
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        path, block = Path(tmp) / "weights.bin", os.urandom(1 << 26)
        with open(path, "wb") as f:
            for _ in range(int(args.gb * 1e9) // len(block)):
                f.write(block)
        size = path.stat().st_size / 1e9
        cached = min(timed_sha256(path) for _ in range(2))
        print(f"{size:.2f} GB from the page cache: {cached:.2f} s, {size / cached:.2f} GB/s; "
              f"a 14 GB pair (Qwen2.5-3B + Qwen3-4B in bf16): {14 / (size / cached):.0f} s")
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            return print("from the disk: not measured (dropping the page cache needs root on Linux)")
        cold = timed_sha256(path)
        print(f"{size:.2f} GB from the disk: {cold:.2f} s, {size / cold:.2f} GB/s; a 14 GB pair: "
              f"{14 / (size / cold):.0f} s")


if __name__ == "__main__":
    main()
