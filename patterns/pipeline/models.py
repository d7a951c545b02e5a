"""The pipeline's three networks, their decoding, and where their weights come from.

- ``DigitCenterNet``: the default detector. A CenterNet-style heatmap detector (one class,
  "digit"): a small conv backbone with a two-level top-down path to stride 4, and three heads
  (object-centre heatmap, box size, sub-cell offset). Chosen over torchvision's Faster R-CNN /
  SSDlite because those, trained from scratch (no downloadable backbone here), do not
  converge within a few CPU minutes, while a heatmap detector on this task does (see the
  README for measured precision/recall). torchvision architectures stay selectable in config
  for real pretrained or fine-tuned weights.
- ``DigitClassifier``: reads one crop (16x16, cut from the normalised image with
  ``torchvision.ops.roi_align``) as 0-9.
- ``SceneClassifier``: looks at the whole image and answers how many digits it holds (0-4),
  independently of the detector, so the business rule can cross-check the two.

Weights sources (``weights`` in config), the same for every stage:
- ``store:NAME/VERSION``: the core model store (safetensors + manifest, sha256-checked);
- ``file:///path/x.safetensors`` or ``s3://bucket/x.safetensors``: a checkpoint at a URI;
- ``torchvision:DEFAULT`` (or a weights enum name such as ``COCO_V1``): torchvision's
  published weights, detector architectures only; they download on first use, so offline
  this fails with a sentence saying so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from core.errors import UnsafeFormatError
from core.model_store import ModelStore
from patterns.pipeline.preprocess import MEAN, STD  # ImageNet statistics (numpy only)
from patterns.pipeline.scenes import CANVAS, MAX_DIGITS

STRIDE = 4  # detector output cell size in input pixels
CROP = 16  # digit classifier input size
TORCHVISION_DETECTORS = ("fasterrcnn_mobilenet_v3_large_fpn", "ssdlite320_mobilenet_v3_large")


def normalise(images_uint8: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, ImageNet-normalised."""
    x = images_uint8.astype(np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(0, 3, 1, 2)


def as_input(images: list[np.ndarray] | np.ndarray, device: str | torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 letterboxed images -> the models' (N, 3, H, W) float32 input on
    ``device``: ``normalise`` done there. The uint8 image is what travels between stages
    (28 KB, a quarter of the float32 tensor), and it crosses to the GPU as uint8 too."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).to(device)
    x = x.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.as_tensor(MEAN, device=x.device)[:, None, None]
    std = torch.as_tensor(STD, device=x.device)[:, None, None]
    return (x - mean) / std


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
    )


class DigitCenterNet(nn.Module):
    """Heatmap detector: (N, 3, 96, 96) -> (N, 5, 24, 24) = centre logit, log w/h, dx/dy.

    Slim on purpose (about 20 M multiply-adds per image): it trains in minutes on 2 CPU
    cores. The stride-16 level sees a whole 36 px digit; the top-down path brings that back
    to stride 4, where neighbouring digits (at least 20 px apart) fall in different cells.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.s4 = nn.Sequential(_conv(3, w, 2), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w))  # 24
        self.s8 = nn.Sequential(_conv(2 * w, 3 * w, 2), _conv(3 * w, 3 * w))  # 12
        self.s16 = nn.Sequential(_conv(3 * w, 4 * w, 2), _conv(4 * w, 4 * w))  # 6
        self.lat16 = nn.Conv2d(4 * w, 2 * w, 1)
        self.lat8 = nn.Conv2d(3 * w, 2 * w, 1)
        self.head = nn.Sequential(_conv(2 * w, 2 * w), nn.Conv2d(2 * w, 5, 1))
        # Start the centre heatmap near p=0.01 so the focal loss does not explode at step 0.
        nn.init.constant_(self.head[-1].bias[:1], -4.6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c4 = self.s4(x)
        c8 = self.s8(c4)
        c16 = self.s16(c8)
        p8 = self.lat8(c8) + F.interpolate(self.lat16(c16), scale_factor=2, mode="nearest")
        p4 = c4 + F.interpolate(p8, scale_factor=2, mode="nearest")
        return self.head(p4)


def decode_centernet(
    out: torch.Tensor, score_threshold: float, max_detections: int = 16
) -> list[dict[str, np.ndarray]]:
    """Peaks of the centre heatmap -> boxes in input pixels, per image.

    The whole batch at once, on the model's device: one top-k over every image, the greedy
    non-maximum suppression of ``torchvision.ops.nms`` (IoU > 0.5 suppresses, in score order,
    the same arithmetic) run for all images together over the at most ``max_detections``
    candidates, and one device-to-host copy at the end. A per-image loop here cost a top-k,
    an NMS and three host syncs per image, so a batch of 64 on a GPU was 192 syncs: batching
    bought nothing (issue 12).
    """
    heat = torch.sigmoid(out[:, 0])
    peaks = heat * (F.max_pool2d(heat[:, None], 3, 1, 1)[:, 0] == heat)
    n, h, w = heat.shape
    k = min(max_detections, h * w)
    scores, idx = peaks.flatten(1).topk(k, dim=1)  # (n, k), each row in descending order
    ys, xs = (idx // w).float(), (idx % w).float()
    pick = idx[:, None, :].expand(n, 2, k)
    size = out[:, 1:3].flatten(2).gather(2, pick).exp() * STRIDE  # (n, 2, k) w, h in pixels
    off = out[:, 3:5].flatten(2).gather(2, pick)
    cx, cy = (xs + off[:, 0]) * STRIDE, (ys + off[:, 1]) * STRIDE
    boxes = torch.stack(
        [cx - size[:, 0] / 2, cy - size[:, 1] / 2, cx + size[:, 0] / 2, cy + size[:, 1] / 2], 2
    ).clamp(0, CANVAS)  # (n, k, 4)
    candidate = scores >= score_threshold
    # Rows are sorted, so each image's candidates are a prefix: only the longest one matters.
    m = int(candidate.sum(1).max()) if n else 0
    boxes, scores, candidate = boxes[:, :m], scores[:, :m], candidate[:, :m]
    kept = _greedy_nms(boxes, candidate, 0.5)
    # One copy to the host for the whole batch: boxes, scores and which of them survived.
    host = torch.cat([boxes, scores[..., None], kept[..., None].float()], 2).cpu().numpy()
    results = []
    for rows in host:
        mine = rows[rows[:, 5] > 0]  # still in descending score order, as nms returns them
        results.append(
            {
                "boxes": np.ascontiguousarray(mine[:, :4]),
                "scores": np.ascontiguousarray(mine[:, 4]),
                "labels": np.zeros(len(mine), dtype=np.int64),
            }
        )
    return results


def _greedy_nms(boxes: torch.Tensor, candidate: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.nms`` for (N, K, 4) boxes already sorted by descending score per row,
    all rows at once: K steps, each a few tensor ops over the whole batch. ``candidate``
    (N, K) marks the boxes that take part (score over the threshold). Returns the kept mask."""
    x1, y1, x2, y2 = boxes.unbind(2)
    areas = (x2 - x1) * (y2 - y1)
    # Pairwise IoU within each image, written as torchvision's CPU kernel computes it.
    ww = torch.minimum(x2[:, :, None], x2[:, None]) - torch.maximum(x1[:, :, None], x1[:, None])
    hh = torch.minimum(y2[:, :, None], y2[:, None]) - torch.maximum(y1[:, :, None], y1[:, None])
    inter = ww.clamp(min=0) * hh.clamp(min=0)
    iou = inter / (areas[:, :, None] + areas[:, None] - inter)
    k = candidate.shape[1]
    later = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)  # j after i
    suppress = (iou > iou_threshold) & later  # (N, K, K): i would suppress j
    kept = candidate.clone()
    for i in range(k):
        # A box still kept at its turn suppresses every later box it overlaps.
        kept &= ~(suppress[:, i] & kept[:, i : i + 1])
    return kept


class DigitClassifier(nn.Module):
    """(N, 3, 16, 16) normalised crops -> (N, 10) logits.

    16 px is enough: the source digits are 8x8, so larger crops only add cost."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv(3, 16), _conv(16, 32), nn.MaxPool2d(2), _conv(32, 48), nn.MaxPool2d(2),
            _conv(48, 64), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SceneClassifier(nn.Module):
    """(N, 3, 96, 96) -> (N, MAX_DIGITS + 1) logits: how many digits the scene holds."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.AvgPool2d(2), _conv(3, w, 2), _conv(w, 2 * w, 2), _conv(2 * w, 3 * w),
            _conv(3 * w, 4 * w, 2),
        )  # fmt: skip
        # Mean over a fixed grid is a scaled sum, which suits counting; max adds "is any".
        self.head = nn.Linear(8 * w, MAX_DIGITS + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        return self.head(pooled)


def crop_digits(images: torch.Tensor, boxes: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Cut each box out of its image as a CROPxCROP patch, padded 10% around the box.

    ``boxes``: per image a (K, 4) tensor, or all of them as one (K, 5) tensor of
    ``[image index, x1, y1, x2, y2]`` rows (what ``rois`` makes: one host-to-device copy)."""
    from torchvision.ops import roi_align

    if not isinstance(boxes, torch.Tensor):
        boxes = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b.float()], 1) for i, b in enumerate(boxes)]
        )
    idx, b = boxes[:, :1], boxes[:, 1:].float()
    pad = 0.1 * (b[:, 2:] - b[:, :2]).amax(1, keepdim=True)
    # Square crops keep a "1" thin and an "0" round, as in training.
    c = (b[:, :2] + b[:, 2:]) / 2
    half = (b[:, 2:] - b[:, :2]).amax(1, keepdim=True) / 2 + pad
    rois = torch.cat([idx.to(b.dtype), c - half, c + half], 1)
    return roi_align(images, rois, output_size=CROP, spatial_scale=1.0, aligned=True)


def box_tensors(boxes: list[Any], device: str | torch.device) -> list[torch.Tensor]:
    """Per image, its (K, 4) boxes (numpy arrays or lists, K may be 0) as float32 tensors on
    ``device``: roi_align wants its boxes on the images' device ("rois must be a CUDA
    tensor" otherwise)."""
    return [torch.as_tensor(b, dtype=torch.float32, device=device).reshape(-1, 4) for b in boxes]


def rois(boxes: list[Any], device: str | torch.device) -> torch.Tensor:
    """Every box of every image as one (K, 5) ``[image index, x1, y1, x2, y2]`` float32
    tensor on ``device``: built on the host, copied once (not once per image)."""
    rows = [
        np.concatenate(
            [np.full((len(b), 1), i, np.float32), np.asarray(b, np.float32).reshape(-1, 4)], 1
        )
        for i, b in enumerate(boxes)
    ]
    host = np.concatenate(rows) if rows else np.zeros((0, 5), np.float32)
    return torch.from_numpy(host).to(device)


def read_digits(
    model: LoadedModel, x: torch.Tensor, boxes: list[torch.Tensor] | torch.Tensor
) -> np.ndarray:
    """(K, 10) digit probabilities for every box of every image of ``x``, in order (one
    forward pass for all crops). Boxes on ``x``'s device, in model-input pixels: per image,
    or as ``rois``."""
    count = len(boxes) if isinstance(boxes, torch.Tensor) else sum(len(b) for b in boxes)
    if count == 0:
        return np.zeros((0, 10), np.float32)
    return torch.softmax(model.module(crop_digits(x, boxes)), 1).cpu().numpy()


# ------------------------------------------------------------------------------ weights
@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    info: dict[str, Any]  # what the answer reports as this stage's model version
    categories: list[str]  # detector label names
    # Held-out figures from the manifest of the version actually loaded (store weights
    # only; a bare checkpoint or published weights carry none).
    heldout_metrics: dict[str, Any] | None = None


class WeightsUnavailable(RuntimeError):
    """Published weights that cannot be fetched (offline, or no such weights)."""


def build_module(arch: str, num_classes: int | None = None) -> nn.Module:
    if arch == "centernet_digits":
        return DigitCenterNet()
    if arch == "digit_cnn":
        return DigitClassifier()
    if arch == "count_cnn":
        return SceneClassifier()
    if arch in TORCHVISION_DETECTORS:
        import torchvision

        kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
        kwargs["num_classes"] = num_classes or 2
        if arch.startswith("fasterrcnn"):
            # Our images are small: do not let the transform upscale them to 800 px.
            kwargs.update(min_size=320, max_size=320)
        return torchvision.models.get_model(arch, **kwargs)
    raise ValueError(
        f"unknown architecture {arch!r}; use one of centernet_digits, digit_cnn, count_cnn, "
        + ", ".join(TORCHVISION_DETECTORS)
    )


def _read_checkpoint(uri: str, storage_options: dict[str, Any] | None) -> bytes:
    import fsspec

    if not uri.endswith(".safetensors"):
        raise UnsafeFormatError(
            f"checkpoint {uri} is not a .safetensors file; pickled checkpoints (.pt/.pth) are "
            "never loaded: convert it with safetensors.torch.save_file(model.state_dict(), ...)."
        )
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        return f.read()


def load_model(
    arch: str,
    weights: str,
    store: ModelStore,
    *,
    storage_options: dict[str, Any] | None = None,
) -> LoadedModel:
    """Build ``arch`` and load ``weights`` (see the module docstring for the forms)."""
    from safetensors.torch import load as load_safetensors

    categories = ["digit"]
    metrics = None
    if weights.startswith("store:"):
        name, _, version = weights[len("store:") :].partition("/")
        state, ref = store.load_torch(name, version or "latest")
        info = {"source": "store", **ref.public()}
        metrics = ref.metadata.get("heldout_metrics")
        module = build_module(arch, _num_classes(state))
    elif weights.startswith(("file://", "s3://", "gs://", "memory://")):
        raw = _read_checkpoint(weights, storage_options)
        state = load_safetensors(raw)
        digest = hashlib.sha256(raw).hexdigest()
        info = {"source": "uri", "uri": weights, "version": f"sha256:{digest[:12]}"}
        module = build_module(arch, _num_classes(state))
    elif weights.startswith("torchvision:"):
        module, categories, info = _torchvision_published(arch, weights.split(":", 1)[1])
        return LoadedModel(module.eval(), info, categories)
    else:
        raise ValueError(
            f"weights {weights!r}: use store:NAME/VERSION, a file:// or s3:// .safetensors "
            "URI, or torchvision:DEFAULT"
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights {weights} do not fit architecture {arch}: {len(missing)} missing and "
            f"{len(unexpected)} unexpected tensors (e.g. {(missing or unexpected)[:3]})"
        )
    if arch in TORCHVISION_DETECTORS and _num_classes(state) not in (None, 2):
        categories = [f"class_{i}" for i in range(_num_classes(state) or 0)]
    return LoadedModel(module.eval(), info, categories, dict(metrics) if metrics else None)


def _num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Class count of a torchvision detector checkpoint (2 = background + digit)."""
    key = "roi_heads.box_predictor.cls_score.weight"  # Faster R-CNN: one row per class
    if key in state:
        return int(state[key].shape[0])
    for key, value in state.items():  # SSDlite: last classification conv, channels = A * C
        if key.startswith("head.classification_head.module_list.0.1.weight"):
            return int(value.shape[0]) // 6
    return None


def _torchvision_published(arch: str, weights_name: str) -> tuple[nn.Module, list[str], dict]:
    if arch not in TORCHVISION_DETECTORS:
        raise WeightsUnavailable(
            f"torchvision publishes no weights for {arch!r}; use store:... or a checkpoint URI."
        )
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    try:
        chosen = enum.DEFAULT if weights_name == "DEFAULT" else enum[weights_name]
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise WeightsUnavailable(
            f"{arch} has no weights {weights_name!r}; choose {names}"
        ) from None
    try:
        module = torchvision.models.get_model(arch, weights=chosen)
    except Exception as exc:  # URLError, socket errors, HTTP 403 from a proxy...
        raise WeightsUnavailable(
            f"could not download torchvision weights {chosen} ({type(exc).__name__}: {exc}); "
            "this machine may be offline. Download them where there is network access, save "
            "the state dict as .safetensors and point weights at its file:// or s3:// URI."
        ) from exc
    info = {"source": "torchvision", "name": arch, "version": str(chosen).split(".")[-1]}
    return module, list(chosen.meta["categories"]), info


def run_detector(
    model: LoadedModel, arch: str, x: torch.Tensor, score_threshold: float
) -> list[dict[str, np.ndarray]]:
    """Detections per image (boxes in input pixels) for any supported detector."""
    if arch == "centernet_digits":
        return decode_centernet(model.module(x), score_threshold)
    # torchvision detectors take unnormalised [0, 1] images and normalise inside.
    mean = torch.as_tensor(MEAN, device=x.device)[:, None, None]
    std = torch.as_tensor(STD, device=x.device)[:, None, None]
    outputs = model.module(list(x * std + mean))
    results = []
    for o in outputs:
        keep = o["scores"] >= score_threshold
        results.append(
            {
                "boxes": o["boxes"][keep].cpu().numpy(),
                "scores": o["scores"][keep].cpu().numpy(),
                # torchvision counts background as class 0; our category list does not.
                "labels": (o["labels"][keep] - (1 if len(model.categories) == 1 else 0))
                .cpu()
                .numpy(),
            }
        )
    return results
