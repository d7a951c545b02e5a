"""Train the pipeline's default models on generated digit scenes and measure them.

    python -m patterns.pipeline.artifacts [--force]

Writes safetensors + manifest into the core model store, version v1:
- ``pipeline-detector``  DigitCenterNet (finds digits; one class)
- ``pipeline-digits``    DigitClassifier (reads a crop as 0-9)
- ``pipeline-scene``     SceneClassifier (counts digits in the whole image, 0-4)
Each manifest's metadata holds the held-out figures (scenes built only from digit images
never used in training): detection precision/recall and AP at IoU 0.5, digit accuracy,
end-to-end code accuracy, count accuracy, and how often the business rule's ``accept`` is
right. A few minutes on 2 CPU cores, one torch thread per model: the scene classifier trains
in a second process beside the other two.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from core.model_store import ModelStore
from patterns.pipeline.scenes import CANVAS, MAX_DIGITS, make_scene

VERSION = "v1"
DETECTOR, DIGITS, SCENE = "pipeline-detector", "pipeline-digits", "pipeline-scene"
# Sizes chosen so training fits ~3-4 CPU minutes on a shared 2-core box; raise them on a
# bigger machine for better figures.
N_TRAIN_SCENES = 3000
N_HELDOUT_SCENES = 400
DETECTOR_EPOCHS = 12
DIGIT_EPOCHS = 6
SCENE_EPOCHS = 30
SCORE_THRESHOLD = 0.3  # detector default in config.yaml; evaluated with the same value


def _log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def _scenes(split: str, n: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    images, boxes, labels = [], [], []
    for i in range(n):
        s = make_scene(split, i)  # type: ignore[arg-type]
        images.append(s.image)
        boxes.append(s.boxes)
        labels.append(s.labels)
    return np.stack(images), boxes, labels


def _centernet_targets(boxes: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Gaussian centre heatmap, log-size and offset targets on the stride-4 grid."""
    from patterns.pipeline.models import STRIDE

    g = CANVAS // STRIDE
    n = len(boxes)
    heat = np.zeros((n, g, g), np.float32)
    size = np.zeros((n, 2, g, g), np.float32)
    off = np.zeros((n, 2, g, g), np.float32)
    mask = np.zeros((n, g, g), np.float32)
    yy, xx = np.mgrid[0:g, 0:g]
    for i, bs in enumerate(boxes):
        for x1, y1, x2, y2 in bs:
            cx, cy = (x1 + x2) / 2 / STRIDE, (y1 + y2) / 2 / STRIDE
            w, h = (x2 - x1) / STRIDE, (y2 - y1) / STRIDE
            sigma = max(0.6, min(w, h) / 6)
            ix, iy = min(int(cx), g - 1), min(int(cy), g - 1)
            gauss = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma**2))
            heat[i] = np.maximum(heat[i], gauss)
            size[i, :, iy, ix] = np.log([w, h])
            off[i, :, iy, ix] = [cx - ix, cy - iy]
            mask[i, iy, ix] = 1.0
    return heat, size, off, mask


def _centernet_loss(out, heat, size, off, mask):
    import torch

    pred = torch.sigmoid(out[:, 0]).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    # CenterNet's focal loss: positives at the exact centre, negatives down-weighted near it.
    pos_loss = (torch.log(pred) * (1 - pred) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - pred) * pred**2 * (1 - heat) ** 4 * (1 - pos)).sum()
    n_pos = pos.sum().clamp(min=1)
    focal = -(pos_loss + neg_loss) / n_pos
    m = mask[:, None]
    size_loss = (torch.abs(out[:, 1:3] - size) * m).sum() / n_pos
    off_loss = (torch.abs(out[:, 3:5] - off) * m).sum() / n_pos
    return focal + 0.5 * size_loss + off_loss


LR = 3e-3


def _fit(model, n: int, batch: int, epochs: int, what: str, step: Callable[..., Any]):
    """The loop all three models share: AdamW, cosine learning rate, one shuffle per epoch.

    ``step(idx)`` runs the model on the rows ``idx`` and returns ``(loss, n_correct)``
    (``n_correct`` None where accuracy means nothing, as for the detector).
    """
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    total, k, t0 = epochs * (n // batch), 0, time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n)
        losses, correct = [], 0
        for start in range(0, n - batch + 1, batch):
            for group in opt.param_groups:
                group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * k / total))
            loss, right = step(perm[start : start + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            correct += right or 0
            k += 1
        acc = "" if right is None else f" train acc {correct / (n // batch * batch):.3f}"
        _log(
            f"{what} epoch {epoch + 1}/{epochs} loss {np.mean(losses):.3f}{acc} "
            f"({time.time() - t0:.0f}s, {n} examples)"
        )
    return model.eval()


def train_detector(x, boxes, seed: int):
    import torch

    from patterns.pipeline.models import DigitCenterNet

    torch.manual_seed(seed)
    targets = [torch.as_tensor(t) for t in _centernet_targets(boxes)]
    model = DigitCenterNet()

    def step(idx):
        return _centernet_loss(model(x[idx]), *[t[idx] for t in targets]), None

    return _fit(model, len(x), 32, DETECTOR_EPOCHS, "detector", step)


def _jitter(boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boxes as a detector would give them: a little off in position and size."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    d = rng.normal(0, 0.08, (len(boxes), 4)) * np.stack([w, h, w, h], 1)
    return (boxes + d).astype(np.float32)


def train_digits(x, boxes, labels, seed: int):
    import torch

    from patterns.pipeline.models import DigitClassifier, crop_digits

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    crops, ys = [], []
    with torch.no_grad():
        for copy in range(2):
            for start in range(0, len(x), 256):
                bs = [
                    torch.as_tensor(b if copy == 0 else _jitter(b, rng))
                    for b in boxes[start : start + 256]
                ]
                crops.append(crop_digits(x[start : start + 256], bs))
                ys.extend(np.concatenate(labels[start : start + 256]).tolist())
    cx, cy = torch.cat(crops), torch.as_tensor(ys)
    model = DigitClassifier()

    def step(idx):
        logits = model(cx[idx])
        loss = torch.nn.functional.cross_entropy(logits, cy[idx])
        return loss, int((logits.argmax(1) == cy[idx]).sum())

    return _fit(model, len(cx), 128, DIGIT_EPOCHS, "digit classifier", step)


def train_scene(x, labels, seed: int):
    import torch

    from patterns.pipeline.models import SceneClassifier

    torch.manual_seed(seed)
    y = torch.as_tensor([len(lab) for lab in labels])
    model = SceneClassifier()

    def step(idx):
        xb = x[idx]
        # Flips and transposes never change how many digits there are: 8x the scenes.
        if torch.rand(()) < 0.5:
            xb = xb.flip(3)
        if torch.rand(()) < 0.5:
            xb = xb.flip(2)
        if torch.rand(()) < 0.5:
            xb = xb.transpose(2, 3)
        logits = model(xb)
        loss = torch.nn.functional.cross_entropy(logits, y[idx])
        return loss, int((logits.argmax(1) == y[idx]).sum())

    return _fit(model, len(x), 64, SCENE_EPOCHS, "scene classifier", step)


def _scene_apart(images: np.ndarray, labels: list[np.ndarray], seed: int) -> dict[str, Any]:
    """``train_scene`` in a process of its own, one torch thread: its weights, as arrays."""
    import torch

    from patterns.pipeline.models import normalise

    torch.set_num_threads(1)
    model = train_scene(torch.as_tensor(normalise(images)), labels, seed)
    return {k: v.numpy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ evaluation
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def _match(pred: np.ndarray, gt: np.ndarray, thr: float = 0.5) -> list[int]:
    """Greedy match (predictions in the given order) -> gt index or -1 per prediction."""
    if len(pred) == 0:
        return []
    if len(gt) == 0:
        return [-1] * len(pred)
    iou = _iou(pred, gt)
    used: set[int] = set()
    out = []
    for i in range(len(pred)):
        j = int(iou[i].argmax())
        if iou[i, j] >= thr and j not in used:
            used.add(j)
            out.append(j)
        else:
            out.append(-1)
    return out


def evaluate(reader, x, boxes, labels) -> dict[str, Any]:
    """Held-out figures of the whole reader (IoU 0.5 throughout)."""
    import torch

    from patterns.pipeline.models import run_detector
    from patterns.pipeline.rules import RuleConfig, decide

    # One detector pass per batch at a tiny threshold: every candidate, for AP@0.5, and,
    # cut at the reader's threshold, the detections the reader reads (greedy NMS keeps the
    # same boxes above that threshold whether or not lower-scored ones were in the running).
    outs: list[dict[str, Any]] = []
    scored: list[tuple[float, int]] = []
    with torch.inference_mode():
        for start in range(0, len(x), 64):
            xb = x[start : start + 64]
            dets = run_detector(reader.detector, reader.detector_arch, xb, 0.01)
            kept = [
                {k: v[d["scores"] >= reader.score_threshold] for k, v in d.items()} for d in dets
            ]
            outs.extend(reader.read(xb, kept))
            for k, d in enumerate(dets):
                order = np.argsort(-d["scores"])
                m = _match(d["boxes"][order], boxes[start + k])
                scored.extend((float(d["scores"][order][i]), int(m[i] >= 0)) for i in range(len(m)))
    n_gt = sum(len(b) for b in boxes)
    scored.sort(key=lambda t: -t[0])
    tp = np.cumsum([t for _, t in scored])
    precision_curve = tp / np.arange(1, len(scored) + 1)
    recall_curve = tp / max(n_gt, 1)
    ap = 0.0
    for r in np.linspace(0, 1, 101):  # COCO-style 101-point interpolation
        p = precision_curve[recall_curve >= r]
        ap += (p.max() if len(p) else 0.0) / 101

    tp_det = fp_det = correct_digits = exact_codes = count_ok = 0
    actions = {"accept": 0, "review": 0, "reject": 0}
    accepted_right = 0
    rules = RuleConfig()
    for out, gb, gl in zip(outs, boxes, labels, strict=True):
        dets = out["detections"]
        pb = np.asarray([d["box"] for d in dets], np.float32).reshape(-1, 4)
        m = _match(pb, gb)
        tp_det += sum(j >= 0 for j in m)
        fp_det += sum(j < 0 for j in m)
        correct_digits += sum(int(j >= 0 and dets[i]["label"] == gl[j]) for i, j in enumerate(m))
        truth = "".join(str(int(gl[i])) for i in np.argsort(gb[:, 0])) if len(gl) else ""
        read = "".join(str(d["label"]) for d in dets)
        exact_codes += read == truth
        count_ok += out["count"] == len(gl)
        decision = decide(dets, out["count"], rules)
        actions[decision["action"]] += 1
        if decision["action"] == "accept":
            accepted_right += decision["code"] == truth
    n = len(outs)
    return {
        "heldout_scenes": n,
        "heldout_digits": n_gt,
        "iou_threshold": 0.5,
        "score_threshold": reader.score_threshold,
        "detection_precision": round(tp_det / max(tp_det + fp_det, 1), 4),
        "detection_recall": round(tp_det / max(n_gt, 1), 4),
        "detection_ap50": round(float(ap), 4),
        "digit_reading_accuracy": round(correct_digits / max(n_gt, 1), 4),
        "code_exact_match": round(exact_codes / n, 4),
        "count_accuracy": round(count_ok / n, 4),
        "rule_accept_rate": round(actions["accept"] / n, 4),
        "rule_accept_precision": round(accepted_right / max(actions["accept"], 1), 4),
        "rule_actions": actions,
        # What guessing would score, so the figures above can be read against it.
        "chance": {"digit_reading_accuracy": 0.1, "count_accuracy": 0.23},
    }


def ensure_artifacts(store: ModelStore | None = None, *, force: bool = False) -> None:
    store = store or ModelStore.open()
    names = (DETECTOR, DIGITS, SCENE)
    if not force and all(store.exists(n, VERSION) for n in names):
        _log(f"models present in {store.root_uri} ({', '.join(names)} @ {VERSION})")
        return
    import torch

    from patterns.pipeline.models import LoadedModel, SceneClassifier, normalise
    from patterns.pipeline.reader import DigitReader

    # One thread: on a shared 2-core box a second OpenMP thread mostly waits on a busy core.
    torch.set_num_threads(1)
    t0 = time.time()
    _log(f"generating {N_TRAIN_SCENES} training scenes and {N_HELDOUT_SCENES} held-out scenes")
    images, boxes, labels = _scenes("train", N_TRAIN_SCENES)
    x = torch.as_tensor(normalise(images))
    h_images, h_boxes, h_labels = _scenes("heldout", N_HELDOUT_SCENES)
    hx = torch.as_tensor(normalise(h_images))
    _log(f"scenes ready ({time.time() - t0:.0f}s)")

    # The scene classifier needs neither of the others: it trains in a process of its own beside
    # them, on a core the other patterns' builds leave free (the same seed, the same weights).
    spawn = multiprocessing.get_context("spawn")  # a fresh process: no fork of torch's threads
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        scene_job = pool.submit(_scene_apart, images, labels, 3)
        detector = train_detector(x, boxes, seed=1)
        digits = train_digits(x, boxes, labels, seed=2)
        scene = SceneClassifier()
        scene.load_state_dict({k: torch.as_tensor(v) for k, v in scene_job.result().items()})
        scene.eval()
    reader = DigitReader(
        LoadedModel(detector, {}, ["digit"]),
        LoadedModel(digits, {}, []),
        LoadedModel(scene, {}, []),
        score_threshold=SCORE_THRESHOLD,
    )
    metrics = evaluate(reader, hx, h_boxes, h_labels)
    _log(f"held-out figures: {metrics}")
    common = {
        "data": "digit scenes from sklearn load_digits (80/20 split of source digits), "
        f"{N_TRAIN_SCENES} training scenes, {CANVAS}x{CANVAS} RGB",
        "heldout_metrics": metrics,
        "train_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    store.save_torch(
        DETECTOR, VERSION, detector.state_dict(),
        {**common, "arch": "centernet_digits", "classes": ["digit"]}, overwrite=force,
    )  # fmt: skip
    store.save_torch(
        DIGITS, VERSION, digits.state_dict(),
        {**common, "arch": "digit_cnn", "classes": [str(i) for i in range(10)]}, overwrite=force,
    )  # fmt: skip
    store.save_torch(
        SCENE, VERSION, scene.state_dict(),
        {**common, "arch": "count_cnn", "classes": list(range(MAX_DIGITS + 1))}, overwrite=force,
    )  # fmt: skip
    _log(f"saved {', '.join(names)} @ {VERSION} to {store.root_uri} ({time.time() - t0:.0f}s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="retrain even if models exist")
    parser.add_argument("--store", help="model store URI (default: COOKBOOK_MODEL_STORE_URI)")
    args = parser.parse_args()
    ensure_artifacts(ModelStore.open(args.store), force=args.force)


if __name__ == "__main__":
    main()
