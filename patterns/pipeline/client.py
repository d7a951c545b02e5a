"""Send a held-out digit scene (digits the models never saw in training) and print the answer.

python -m patterns.pipeline.client                 # held-out scene 12, raw PNG body
python -m patterns.pipeline.client --scene 7 --save /tmp/scene.png
python -m patterns.pipeline.client --batch 4       # 4 scenes in one multipart request
"""

from __future__ import annotations

import argparse
import json
import re
from functools import lru_cache
from typing import Any

from patterns.pipeline.scenes import make_scene, scene_png


@lru_cache(maxsize=64)
def _cached_png(index: int) -> bytes:
    return scene_png("heldout", index)


def sample_request(i: int) -> dict[str, Any]:
    """One request for the load tests (loadtests.run): one of 64 held-out scenes, raw PNG
    (cached, so the load generator spends its CPU on sending, not on drawing scenes)."""
    return {
        "method": "POST",
        "path": "/pipeline/read",
        "data": _cached_png(i % 64),
        "headers": {"Content-Type": "image/png"},
    }


def compact_json(value: Any) -> str:
    """Indented JSON with short lists of numbers (boxes) kept on one line."""
    text = json.dumps(value, indent=2)
    return re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + " ".join(m[1].split()) + "]", text)


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/pipeline")
    parser.add_argument("--scene", type=int, default=12, help="held-out scene number")
    parser.add_argument("--batch", type=int, default=0, help="send N scenes in one request")
    parser.add_argument("--save", help="also write the scene PNG here, to look at it")
    args = parser.parse_args()

    with httpx.Client(timeout=30) as client:
        if args.batch:
            files = [
                ("images", (f"scene-{i}.png", scene_png("heldout", args.scene + i), "image/png"))
                for i in range(args.batch)
            ]
            r = client.post(f"{args.url}/read/batch", files=files)
            truth = [make_scene("heldout", args.scene + i).code for i in range(args.batch)]
        else:
            png = scene_png("heldout", args.scene)
            if args.save:
                with open(args.save, "wb") as f:
                    f.write(png)
            r = client.post(f"{args.url}/read", content=png, headers={"Content-Type": "image/png"})
            truth = [make_scene("heldout", args.scene).code]
    print(f"HTTP {r.status_code}")
    print(compact_json(r.json()))
    print(f"ground truth code(s): {truth}")


if __name__ == "__main__":
    main()
