"""Send a held-out digit scene (digits the models never saw in training) and print the answer.

python -m patterns.pipeline.client                 # held-out scene 12, raw PNG body
python -m patterns.pipeline.client --scene 7 --save /tmp/scene.png
python -m patterns.pipeline.client --batch 4       # 4 scenes in one multipart request
python -m patterns.pipeline.client --readme        # the README's example answers, as shown there
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


# The README's examples: scene 12 answered in full (accepted), and the part of scene 13's
# answer that shows a disagreement between the two models (sent to review).
README_EXAMPLES: dict[int, tuple[str, ...] | None] = {12: None, 13: ("scene", "decision")}


def read_scene(client: Any, url: str, scene: int) -> dict[str, Any]:
    """POST held-out scene ``scene`` as a raw PNG body to ``url``/read; the JSON answer."""
    png = scene_png("heldout", scene)
    r = client.post(f"{url}/read", content=png, headers={"Content-Type": "image/png"})
    r.raise_for_status()
    return r.json()


def readme_block(scene: int, answer: dict[str, Any]) -> str:
    """One example as the README shows it: a marker line naming the scene, then the answer
    (or the part of it the example is about) as a JSON code block."""
    keys = README_EXAMPLES.get(scene)
    shown = {k: answer[k] for k in keys} if keys else answer
    return f"<!-- client --readme: scene {scene} -->\n```json\n{compact_json(shown)}\n```"


_BLOCK = re.compile(r"<!-- client --readme: scene (\d+) -->\n```json\n(.*?)\n```", re.S)


def readme_examples(markdown: str) -> dict[int, Any]:
    """The examples a README shows, read back: scene number -> the JSON shown."""
    return {int(m[1]): json.loads(m[2]) for m in _BLOCK.finditer(markdown)}


def readme_blocks(url: str) -> list[str]:
    import httpx

    with httpx.Client(timeout=30) as client:
        read_scene(client, url, 0)  # the first answer after a deploy pays for warm-up
        return [readme_block(i, read_scene(client, url, i)) for i in README_EXAMPLES]


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/pipeline")
    parser.add_argument("--scene", type=int, default=12, help="held-out scene number")
    parser.add_argument("--batch", type=int, default=0, help="send N scenes in one request")
    parser.add_argument("--save", help="also write the scene PNG here, to look at it")
    parser.add_argument(
        "--readme", action="store_true", help="print the README's example answers (paste them)"
    )
    args = parser.parse_args()

    if args.readme:
        print("\n\n".join(readme_blocks(args.url)))
        return
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
