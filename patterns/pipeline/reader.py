"""All three models in one process: the monolith the Serve pipeline is compared with.

``artifacts.py`` measures quality with it and ``bench/benchmark.py`` uses it as the raw-PyTorch
baseline. The Serve stages (``stages.py``) call the same functions (``run_detector``,
``read_digits``, the classifiers), so both paths read a scene the same way, on CPU or CUDA:
``x`` and the models on one device, and every tensor made here on that device too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from patterns.pipeline.models import LoadedModel, box_tensors, read_digits, run_detector


@dataclass
class DigitReader:
    detector: LoadedModel
    digits: LoadedModel
    scene: LoadedModel
    detector_arch: str = "centernet_digits"
    score_threshold: float = 0.3

    @torch.inference_mode()
    def read(
        self, x: torch.Tensor, detections: list[dict[str, np.ndarray]] | None = None
    ) -> list[dict[str, Any]]:
        """(N, 3, 96, 96) normalised -> per image: detections (left to right) and count.

        ``detections``: the detector's output for ``x`` at ``score_threshold``, where the
        caller has it already (``artifacts.evaluate``); otherwise the detector runs here."""
        dets = detections
        if dets is None:
            dets = run_detector(self.detector, self.detector_arch, x, self.score_threshold)
        counts = torch.softmax(self.scene.module(x), 1).cpu()
        # Every tensor made here lives on x's device (the models' device): roi_align refuses
        # CPU boxes for CUDA images.
        probs = read_digits(self.digits, x, box_tensors([d["boxes"] for d in dets], x.device))
        out, start = [], 0
        for i, d in enumerate(dets):
            p = probs[start : start + len(d["boxes"])]
            start += len(d["boxes"])
            out.append(
                {
                    "detections": assemble(d["boxes"], d["scores"], p),
                    "count": int(counts[i].argmax()),
                    "count_confidence": float(counts[i].max()),
                }
            )
        return out


def assemble(boxes: np.ndarray, scores: np.ndarray, digit_probs: np.ndarray) -> list[dict]:
    """Detections as the answer shows them, sorted left to right (reading order)."""
    items = []
    for b, s, p in zip(boxes, scores, digit_probs, strict=True):
        items.append(
            {
                "box": [round(float(v), 1) for v in b],
                "score": round(float(s), 4),
                "label": int(p.argmax()),
                "digit_confidence": round(float(p.max()), 4),
            }
        )
    return sorted(items, key=lambda d: d["box"][0])
