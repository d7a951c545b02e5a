"""The request flow without Serve: ``PipelineFlow`` over the real stage classes and trained
models in this process (``InProcessStages``), the monolith reader, and each stage's batch
metrics. Every test runs on the CPU and again on CUDA where there is a GPU (``gpu`` marker)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from core.errors import BadRequest, PayloadTooLarge, ServiceUnavailable, Unprocessable
from core.model_store import ModelStore
from patterns.pipeline import artifacts
from patterns.pipeline.flow import PipelineFlow
from patterns.pipeline.rules import RuleConfig
from patterns.pipeline.scenes import CANVAS, make_scene, scene_png
from patterns.pipeline.stages import InProcessStages
from tests.pipeline.images import encode, png_bomb


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")],
    ),
]
TIMINGS = {"preprocess", "detector", "scene_classifier", "digit_classifier", "business_rules"}


@pytest.fixture(scope="module")
def store() -> ModelStore:
    artifacts.ensure_artifacts()
    return ModelStore.open()


@pytest.fixture(scope="module", params=DEVICES)
def stages(request: pytest.FixtureRequest, store: ModelStore) -> InProcessStages:
    return InProcessStages.load(store, request.param)


def _flow(stages: Any, **kw: Any) -> PipelineFlow:
    return PipelineFlow(stages, rules=RuleConfig(), **kw)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


# ------------------------------------------------------------------------------ reading
def test_reads_heldout_scenes(stages: InProcessStages) -> None:
    """Scenes built from digit images the models never saw are read, digit by digit, and
    the answer has the shape the app serves."""
    flow = _flow(stages)

    async def read_all() -> list[dict]:
        return [await flow.read(scene_png("heldout", 100 + i), f"r{i}") for i in range(12)]

    answers = _run(read_all())
    exact = right = total = 0
    for i, body in enumerate(answers):
        code = make_scene("heldout", 100 + i).code
        read = "".join(str(d["label"]) for d in body["detections"])
        exact += read == code
        right += sum(a == b for a, b in zip(read, code, strict=False))
        total += len(code)
        assert set(body["timings_ms"]) >= TIMINGS | {"total"}, body["timings_ms"]
        assert body["decision"]["action"] in ("accept", "review", "reject")
        assert body["degraded"] is False and body["request_id"] == f"r{i}"
        devices = {v["device"] for v in body["model_versions"].values()}
        assert devices == {stages.detector.device}
    assert right / total >= 0.85 and exact >= 9, (right, total, exact)


def test_flow_reads_like_the_monolith(stages: InProcessStages) -> None:
    """The stages, one call each, answer what the monolith reader answers for the same
    image on the same device: same boxes, scores, labels and count."""
    from patterns.pipeline.models import as_input
    from patterns.pipeline.preprocess import ImageLimits, prepare
    from patterns.pipeline.reader import DigitReader

    reader = DigitReader(stages.detector.model, stages.digits.model, stages.scene.model)
    flow = _flow(stages)
    for i in (2, 12, 13, 16):
        png = scene_png("heldout", i)
        body = _run(flow.read(png, "x"))
        (mono,) = reader.read(as_input([prepare(png, ImageLimits()).image], stages.detector.device))
        assert body["scene"]["digit_count"] == mono["count"]
        keys = ("box", "score", "label", "digit_confidence")
        got = [[d[k] for k in keys] for d in body["detections"]]
        assert got == [[d[k] for k in keys] for d in mono["detections"]], i


@pytest.mark.parametrize("device", DEVICES)
def test_monolith_reader_runs_on_the_models_device(store: ModelStore, device: str) -> None:
    """DigitReader on ``device``: the boxes it makes for roi_align live on that device (on
    CUDA, CPU boxes fail with "rois must be a CUDA tensor"), with and without detections
    handed in (artifacts.evaluate hands them in as numpy arrays)."""
    import torch

    from patterns.pipeline.models import as_input, load_model, run_detector
    from patterns.pipeline.reader import DigitReader

    models = [
        load_model(arch, f"store:{name}/v1", store)
        for arch, name in (
            ("centernet_digits", artifacts.DETECTOR),
            ("digit_cnn", artifacts.DIGITS),
            ("count_cnn", artifacts.SCENE),
        )
    ]
    for m in models:
        m.module.to(device)
    reader = DigitReader(*models, score_threshold=artifacts.SCORE_THRESHOLD)
    scenes = [make_scene("heldout", 200 + i) for i in range(16)]
    x = as_input([s.image for s in scenes], device)
    assert x.device.type == device
    out = reader.read(x)
    with torch.inference_mode():
        handed = reader.read(x, run_detector(reader.detector, "centernet_digits", x, 0.3))
    assert [o["detections"] for o in handed] == [o["detections"] for o in out]
    codes = ["".join(str(d["label"]) for d in o["detections"]) for o in out]
    right = sum(c == s.code for c, s in zip(codes, scenes, strict=True))
    assert right >= 13, (codes, [s.code for s in scenes])
    assert sum(o["count"] == len(s.code) for o, s in zip(out, scenes, strict=True)) >= 12


# ------------------------------------------------------------------------------ refusals
def test_bad_images_are_refused_with_a_sentence(stages: InProcessStages) -> None:
    flow = _flow(stages, max_image_bytes=100_000)
    cases = [
        (b"", BadRequest, "The image is empty"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100_000), PayloadTooLarge, "at most 100000 bytes"),
        (b"just text", Unprocessable, "not a PNG or JPEG"),
        (png_bomb(), PayloadTooLarge, "claims 50000x50000 pixels"),
        (scene_png("heldout", 3)[:200], Unprocessable, "truncated or corrupt"),
    ]
    for data, error, phrase in cases:
        with pytest.raises(error, match=phrase):
            _run(flow.read(data, "x"))
    gif = encode(np.zeros((20, 20, 3), np.uint8), "GIF")
    with pytest.raises(Exception, match="The image is GIF") as info:
        _run(flow.read(gif, "x"))
    assert info.value.status_code == 415  # type: ignore[attr-defined]


def test_several_images_at_once(stages: InProcessStages) -> None:
    flow = _flow(stages)
    files = [(f"s{i}.png", scene_png("heldout", 10 + i)) for i in range(3)]
    body = _run(flow.read_many(files, "batch"))
    assert body["count"] == 3 and set(body["timings_ms"]) == {"total"}
    assert [r["request_id"] for r in body["results"]] == ["batch/0", "batch/1", "batch/2"]
    codes = [r["decision"]["code"] for r in body["results"]]
    assert codes == [make_scene("heldout", 10 + i).code for i in range(3)], codes
    mixed = [("good.png", scene_png("heldout", 0)), ("bomb.png", png_bomb())]
    with pytest.raises(PayloadTooLarge, match=r"^Image 2 \(bomb\.png\): The image claims"):
        _run(flow.read_many(mixed, "batch"))


# ------------------------------------------------------------------------------ failures
class _Faulty(InProcessStages):
    """The same real stages, with one call made late or failing (what a stuck or dead
    replica looks like from the flow), and the tasks it made kept to check cancellation."""

    def __init__(self, stages: InProcessStages, stage: str, fault: str) -> None:
        super().__init__(stages.preprocessor, stages.detector, stages.scene, stages.digits)
        self.stage, self.fault = stage, fault
        self.tasks: dict[str, asyncio.Task] = {}

    def _faulty(self, name: str, task: asyncio.Task) -> asyncio.Task:
        if name == self.stage:

            async def broken() -> Any:
                if self.fault == "late":
                    await asyncio.sleep(30)
                raise RuntimeError(f"{name} replica died")

            task.cancel()
            task = asyncio.ensure_future(broken())
        self.tasks[name] = task
        return task

    def preprocess(self, data: bytes) -> asyncio.Task:
        return self._faulty("preprocess", super().preprocess(data))

    def detect(self, prepared: Any) -> asyncio.Task:
        return self._faulty("detector", super().detect(prepared))

    def count(self, prepared: Any) -> asyncio.Task:
        return self._faulty("scene_classifier", super().count(prepared))

    def read_digits(self, prepared: Any, detections: Any) -> asyncio.Task:
        return self._faulty("digit_classifier", super().read_digits(prepared, detections))


def _read_with(stages: InProcessStages, stage: str, fault: str) -> tuple[Any, _Faulty]:
    faulty = _Faulty(stages, stage, fault)
    flow = _flow(faulty, stage_timeout_s=0.5)

    async def go() -> Any:
        try:
            return await flow.read(scene_png("heldout", 12), "x")
        except ServiceUnavailable as exc:
            return exc
        finally:
            await asyncio.sleep(0)  # let cancellations land

    return _run(go()), faulty


@pytest.mark.parametrize("fault", ["late", "failing"])
def test_a_late_or_failing_scene_classifier_degrades_to_review(
    stages: InProcessStages, fault: str
) -> None:
    body, faulty = _read_with(stages, "scene_classifier", fault)
    assert body["degraded"] is True
    died = "error: RuntimeError: scene_classifier replica died"
    assert body["scene"]["status"] == ("timeout" if fault == "late" else died)
    assert body["decision"]["action"] == "review"
    assert any("not cross-checked" in r for r in body["decision"]["reasons"])
    assert body["decision"]["code"] == "4629"  # the digits are still read
    assert "scene_classifier" not in body["timings_ms"]
    if fault == "late":
        assert faulty.tasks["scene_classifier"].cancelled()  # not left running


@pytest.mark.parametrize(
    ("stage", "fault", "sentence"),
    [
        ("preprocess", "late", "The preprocess stage did not answer within 0.5 s"),
        ("preprocess", "failing", "The preprocess stage failed (error: RuntimeError: prep"),
        ("detector", "late", "The detector stage did not answer (timeout)"),
        ("detector", "failing", "The detector stage did not answer (error: RuntimeError: det"),
        ("digit_classifier", "late", "The digit classifier stage did not answer within 0.5 s"),
        ("digit_classifier", "failing", "The digit classifier stage failed (error: Runtime"),
    ],
)
def test_a_late_or_failing_required_stage_is_a_503(
    stages: InProcessStages, stage: str, fault: str, sentence: str
) -> None:
    err, faulty = _read_with(stages, stage, fault)
    assert isinstance(err, ServiceUnavailable), err
    assert err.status_code == 503 and err.message.startswith(sentence), err.message
    assert err.message.endswith("retry shortly.")
    if stage == "detector":  # the digit call waiting on its boxes is not left behind
        assert faulty.tasks["digit_classifier"].done()


# ------------------------------------------------------------------------------ GET /model
def test_model_info_names_versions_devices_and_heldout_quality(
    stages: InProcessStages,
) -> None:
    body = _run(_flow(stages).model_info())
    device = stages.detector.device
    for name in ("detector", "scene_classifier", "digit_classifier"):
        assert body[name]["version"] == "v1" and body[name]["device"] == device
        assert body[name]["source"] == "store" and len(body[name]["sha256"]) == 12
    assert body["detector"]["heldout"]["detection_recall"] > 0.9
    assert body["scene_classifier"]["heldout"]["count_accuracy"] > 0.8
    assert body["digit_classifier"]["heldout"]["digit_reading_accuracy"] > 0.9
    assert body["heldout_metrics"]["code_exact_match"] > 0.8
    assert body["business_rules"]["min_digit_confidence"] == RuleConfig().min_digit_confidence


def test_model_info_is_a_503_when_a_stage_does_not_answer(stages: InProcessStages) -> None:
    class Silent(InProcessStages):
        def model_info(self) -> dict[str, asyncio.Task]:
            calls = super().model_info()
            calls["scene_classifier"].cancel()
            calls["scene_classifier"] = asyncio.ensure_future(asyncio.sleep(30))
            return calls

    silent = Silent(stages.preprocessor, stages.detector, stages.scene, stages.digits)
    with pytest.raises(ServiceUnavailable, match=r"Only 2 of 3 model stages .*scene_classifier"):
        _run(_flow(silent, stage_timeout_s=0.3).model_info())


# ------------------------------------------------------------------------------ metrics
class _Recorder:
    """Where ``timed_batch`` writes (the role ModelMetrics plays in a replica)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def observe(self, latency_s: float, ok: bool = True) -> None:
        self.calls.append(("ok" if ok else "error", latency_s))

    def observe_batch(self, size: int) -> None:
        self.calls.append(("batch", size))


def test_each_batch_is_timed_and_failed_batches_are_counted(stages: InProcessStages) -> None:
    detector = stages.detector
    recorder = _Recorder()
    detector.metrics = recorder  # type: ignore[assignment]
    try:
        images = [make_scene("heldout", i).image for i in range(3)]
        out = detector.run(images)
        assert len(out) == 3 and {o["batch_size"] for o in out} == {3}
        assert out[0]["compute_ms"] > 0
        with pytest.raises(RuntimeError):  # a 2-D "image": the batch fails inside the model
            detector.run([np.zeros((CANVAS, CANVAS), np.uint8)])
    finally:
        detector.metrics = None
    assert [c[0] for c in recorder.calls] == ["ok", "batch", "error", "batch"]
    assert recorder.calls[1] == ("batch", 3) and recorder.calls[3] == ("batch", 1)
