"""Resource profiles: ask for a GPU fraction, get a CPU placement where there is no GPU.

A stage states what it wants (``StageResources``) in the pattern's config; when the app is
built, ``resolve_actor_options`` turns it into Ray ``ray_actor_options``. Where the cluster has
no GPU, a GPU request becomes a CPU placement (logged), not a replica waiting forever.

A stage also says which kind of node it prefers (``node_kind``: ``accelerator`` for models,
``general`` for ingresses and I/O). That becomes a Ray label selector on ``NODE_KIND_LABEL``
with a fallback to any node: the same config places stages on a labelled multi-node cluster,
runs on one unlabelled node, and moves to the survivors when the accelerator node is gone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from core.settings import get_settings

logger = logging.getLogger("core.resources")

# The node label every node of a multi-node cluster carries (`ray start --labels`, the
# RayService's worker groups): accelerator nodes run the models, general nodes the rest.
NODE_KIND_LABEL = "cookbook.io/node-kind"


class StageResources(BaseModel):
    """What one deployment's replica asks for. Config, not code."""

    # Small fractions on purpose: every pattern runs together on a 2-core laptop profile.
    num_cpus: float = Field(default=0.1, ge=0)
    # 0.5 and 0.25 let two or four model replicas share one GPU (fractional GPUs).
    num_gpus: float = Field(default=0.0, ge=0)
    # CPUs to ask for instead when num_gpus cannot be honoured (None: keep num_cpus).
    cpu_fallback_num_cpus: float | None = Field(default=None, ge=0)
    memory_mb: int | None = Field(default=None, gt=0)
    # Where the replica prefers to run (None: "accelerator" if it asks for a GPU, else
    # "general"); "any": no preference; "head": on the head node, always (a single writer
    # whose files are on the head's disk, say; with one node that is every replica).
    node_kind: Literal["accelerator", "general", "any", "head"] | None = None


def _local_gpu_count() -> int:
    """GPUs on this host, without importing torch or calling Ray."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return sum(1 for _ in gpus.iterdir()) if gpus.is_dir() else 0
    except OSError:
        return 0


def cluster_gpu_count() -> float:
    """GPUs the app can be placed on: the Ray cluster's if connected, else this host's."""
    mode = get_settings().accelerator
    if mode == "cpu":
        return 0.0
    try:
        import ray

        if ray.is_initialized():
            gpus = float(ray.cluster_resources().get("GPU", 0.0))
            return gpus if mode == "auto" else max(gpus, 1.0)
    except Exception:  # pragma: no cover - a broken Ray install is reported elsewhere
        logger.warning("could not read cluster resources; assuming no GPU", exc_info=True)
    local = float(_local_gpu_count())
    return local if mode == "auto" else max(local, 1.0)


def resolve_actor_options(
    res: StageResources, stage: str, *, gpus_available: float | None = None
) -> dict[str, Any]:
    """Ray ``ray_actor_options`` for ``res``, falling back to CPU where no GPU exists."""
    gpus = cluster_gpu_count() if gpus_available is None else gpus_available
    options: dict[str, Any] = {"num_cpus": res.num_cpus}
    if res.memory_mb:
        options["memory"] = res.memory_mb * 1024 * 1024
    if res.num_gpus > 0 and gpus > 0:
        options["num_gpus"] = res.num_gpus
        logger.info("stage %s: placed on GPU (num_gpus=%s)", stage, res.num_gpus)
    elif res.num_gpus > 0:
        if res.cpu_fallback_num_cpus is not None:
            options["num_cpus"] = res.cpu_fallback_num_cpus
        logger.warning(
            "stage %s: asked for num_gpus=%s but the cluster has no GPU; placed on CPU "
            "(num_cpus=%s)",
            stage,
            res.num_gpus,
            options["num_cpus"],
        )
    kind = res.node_kind or ("accelerator" if res.num_gpus > 0 else "general")
    if kind == "head":  # Ray's own resource of the head node (a requirement, no fallback)
        options["resources"] = {"node:__internal_head__": 0.001}
    elif kind != "any":
        # A preference, not a requirement: the fallback (any node) keeps one unlabelled
        # node working, and moves a replica to a survivor when its node kind is gone.
        want = "accelerator" if kind == "accelerator" else "!accelerator"
        options["label_selector"] = {NODE_KIND_LABEL: want}
        options["fallback_strategy"] = [{"label_selector": {}}]
    return options


def wants_gpu(options: dict[str, Any]) -> bool:
    """Whether resolved actor options put the replica on a GPU (to pick the torch device)."""
    return float(options.get("num_gpus", 0) or 0) > 0


def torch_device(on_gpu: bool) -> str:
    """The torch device for a replica: ``"cuda"`` when it was given a GPU and CUDA is there.

    ``on_gpu`` comes from the builder (``wants_gpu`` of the resolved options), not from
    ``torch.cuda.is_available()`` alone: a CPU replica on a GPU node must stay off the GPU it
    was not given (Ray hides it through CUDA_VISIBLE_DEVICES, but a local run does not).
    """
    if not on_gpu:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
