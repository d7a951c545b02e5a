"""Create every pattern's default artifacts (trained models, seeded databases) if missing.

Each pattern that needs artifacts has ``patterns/<name>/artifacts.py`` with
``ensure_artifacts(store=None, *, force=False)``. This script finds them and runs them, so adding
a pattern never means editing the Makefile. Idempotent: a second run does nothing.

Patterns build side by side, each in a process of its own with one torch thread (``--jobs``,
default: one per core, at most 2). Their artifacts never share a file, and the longest build
(the pipeline's training) uses one thread anyway, so on a 2-core machine the others fit beside
it.

    python -m scripts.build_artifacts [--force] [--jobs N] [pattern ...]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.timing import heartbeat

PATTERNS_DIR = Path(__file__).resolve().parents[1] / "patterns"
# Started first: the pipeline's training is the longest build and the chat's adapters the next,
# so the short builds fill in beside them instead of delaying the longest one's start.
LONGEST_FIRST = ("pipeline", "multiplexing")


def discover() -> list[str]:
    names = sorted(p.parent.name for p in PATTERNS_DIR.glob("*/artifacts.py"))
    first = {n: i for i, n in enumerate(LONGEST_FIRST)}
    return sorted(names, key=lambda n: first.get(n, len(first)))


def build_one(name: str, force: bool, tag: str) -> None:
    t0 = time.perf_counter()
    print(f"[artifacts {tag}] {name}: checking", flush=True)
    module = importlib.import_module(f"patterns.{name}.artifacts")
    # A pattern's steps print their own lines; between them (a model training, a base model
    # loading) this one says the build is alive at least every 10 s.
    with heartbeat(lambda msg: print(msg, flush=True), f"{name}", every_s=10):
        module.ensure_artifacts(force=force)
    print(f"[artifacts {tag}] {name}: ready ({time.perf_counter() - t0:.1f}s)", flush=True)


def _child(name: str, force: bool, tag: str) -> int:
    """One pattern's build in a process of its own; its lines go straight to our stdout. One
    torch thread each: two builds with two threads each on two cores took longer, side by
    side, than one after the other."""
    argv = [sys.executable, "-m", "scripts.build_artifacts", "--jobs", "1", "--tag", tag, name]
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    return subprocess.run([*argv, "--force"] if force else argv, env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", help="only these patterns (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="builds side by side"
    )
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.patterns or discover()
    if not names:
        print("[artifacts] no pattern defines artifacts yet; nothing to build", flush=True)
        return 0
    tags = [args.tag or f"{i}/{len(names)}" for i in range(1, len(names) + 1)]
    if args.jobs <= 1 or len(names) == 1:
        for name, tag in zip(names, tags, strict=True):
            build_one(name, args.force, tag)
        return 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(_child, names, [args.force] * len(names), tags))
    failed = [n for n, c in zip(names, codes, strict=True) if c != 0]
    if failed:
        print(f"[artifacts] failed: {', '.join(failed)}", flush=True)
        return 1
    took = time.perf_counter() - t0
    print(f"[artifacts] {len(names)} ready in {took:.0f}s, {args.jobs} side by side", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
