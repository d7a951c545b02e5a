"""Create every pattern's default artifacts (trained models, seeded databases) if missing.

Each pattern that needs artifacts has ``patterns/<name>/artifacts.py`` with
``ensure_artifacts(store=None, *, force=False)``. This script finds them and runs each in turn,
so adding a pattern never means editing the Makefile. Idempotent: a second run does nothing.

    python -m scripts.build_artifacts [--force] [pattern ...]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from core.timing import heartbeat

PATTERNS_DIR = Path(__file__).resolve().parents[1] / "patterns"


def discover() -> list[str]:
    return sorted(p.parent.name for p in PATTERNS_DIR.glob("*/artifacts.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", help="only these patterns (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    names = args.patterns or discover()
    if not names:
        print("[artifacts] no pattern defines artifacts yet; nothing to build", flush=True)
        return 0
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        print(f"[artifacts {i}/{len(names)}] {name}: checking", flush=True)
        module = importlib.import_module(f"patterns.{name}.artifacts")
        # A pattern's steps print their own lines; between them (a model training, a base
        # model loading) this one says the build is alive at least every 10 s.
        with heartbeat(lambda msg: print(msg, flush=True), f"{name}", every_s=10):
            module.ensure_artifacts(force=args.force)
        print(
            f"[artifacts {i}/{len(names)}] {name}: ready ({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
