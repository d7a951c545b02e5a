"""Model store: round trips in every safe format, and every refusal path."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from core.errors import IntegrityError, InvalidModelId, ModelNotFound, UnsafeFormatError
from core.model_store import ModelStore


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path.as_uri())


def test_torch_round_trip_and_manifest(store: ModelStore, tmp_path) -> None:
    import torch

    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    ref = store.save_torch("digits", "v1", sd, {"accuracy": 0.97})
    loaded, ref2 = store.load_torch("digits")
    assert torch.equal(loaded["w"], sd["w"]) and torch.equal(loaded["b"], sd["b"])
    assert ref2.version == "v1" and ref2.metadata["accuracy"] == 0.97
    assert ref.sha256 == ref2.sha256
    manifest = json.loads((tmp_path / "digits" / "v1" / "manifest.json").read_text())
    assert manifest["format"] == "safetensors"
    assert set(manifest["files"]) == {"model.safetensors"}


def test_versions_sort_naturally_and_are_immutable(store: ModelStore) -> None:
    for v in ("v2", "v10", "v1"):
        store.save_files("m", v, {"model.json": b"{}"}, "json")
    assert store.versions("m") == ["v1", "v2", "v10"]
    assert store.latest("m") == "v10"
    with pytest.raises(FileExistsError):
        store.save_files("m", "v1", {"model.json": b"{}"}, "json")


def test_sklearn_round_trip_via_skops(store: ModelStore) -> None:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    store.save_sklearn("iris", "v1", est)
    loaded, ref = store.load_sklearn("iris", "v1")
    assert ref.format == "skops"
    np.testing.assert_array_equal(loaded.predict(x), est.predict(x))


def test_xgboost_round_trip_ubj(store: ModelStore) -> None:
    import xgboost as xgb
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    clf = xgb.XGBClassifier(n_estimators=10, max_depth=3).fit(x, y)
    store.save_xgboost("bc", "v1", clf)
    booster, _ = store.load_xgboost("bc")
    np.testing.assert_allclose(
        booster.predict(xgb.DMatrix(x)), clf.predict_proba(x)[:, 1], rtol=1e-5
    )


def test_tampered_artifact_is_refused(store: ModelStore, tmp_path) -> None:
    import torch

    store.save_torch("digits", "v1", {"w": torch.zeros(4)})
    path = tmp_path / "digits" / "v1" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        store.load_torch("digits", "v1")


def test_missing_file_is_refused(store: ModelStore, tmp_path) -> None:
    store.save_files("m", "v1", {"model.json": b"{}"}, "json")
    (tmp_path / "m" / "v1" / "model.json").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.read_verified("m", "v1")


def test_pickle_is_refused_on_save(store: ModelStore) -> None:
    payload = pickle.dumps({"a": 1})
    with pytest.raises(UnsafeFormatError, match="pickle"):
        store.save_files("m", "v1", {"model.json": payload}, "json")
    with pytest.raises(UnsafeFormatError):
        store.save_files("m", "v1", {"model.pkl": payload}, "json")
    with pytest.raises(UnsafeFormatError, match="not allowed"):
        store.save_files("m", "v1", {"model.pkl": payload}, "pickle")


def test_torch_save_zip_is_refused(store: ModelStore, tmp_path) -> None:
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(UnsafeFormatError, match="pickle"):
        store.save_files(
            "m", "v1", {"model.safetensors": (tmp_path / "w.pt").read_bytes()}, "safetensors"
        )


def test_pickle_planted_in_storage_is_refused_on_load(store: ModelStore, tmp_path) -> None:
    """Someone with write access swaps the file AND rewrites the manifest digest."""
    import hashlib

    store.save_files("m", "v1", {"model.json": b"{}"}, "json")
    vdir = tmp_path / "m" / "v1"
    payload = pickle.dumps(["boom"])
    (vdir / "model.json").write_bytes(payload)
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["files"]["model.json"] = hashlib.sha256(payload).hexdigest()
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeFormatError, match="pickle"):
        store.read_verified("m", "v1")


def test_manifest_claiming_pickle_format_is_refused(store: ModelStore, tmp_path) -> None:
    store.save_files("m", "v1", {"model.json": b"{}"}, "json")
    mpath = tmp_path / "m" / "v1" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["format"] = "pickle"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(UnsafeFormatError):
        store.read_verified("m", "v1")


def test_skops_with_untrusted_type_is_refused(store: ModelStore) -> None:
    # FunctionTransformer(func=os.system) would call os.system on predict.
    import os

    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    data = skops.io.dumps(FunctionTransformer(func=os.system))
    store.save_files("evil", "v1", {"model.skops": data}, "skops")
    with pytest.raises(UnsafeFormatError, match="untrusted"):
        store.load_sklearn("evil", "v1")


@pytest.mark.parametrize(
    "bad", ["../etc", "..", "a/b", "/abs", "UPPER", "", "a" * 65, "x..y", ".hidden", "v1\n"]
)
def test_path_traversal_ids_are_refused(store: ModelStore, bad: str) -> None:
    with pytest.raises(InvalidModelId):
        store.save_files(bad, "v1", {"model.json": b"{}"}, "json")
    with pytest.raises(InvalidModelId):
        store.read_verified("ok", bad)


def test_bad_file_names_are_refused(store: ModelStore) -> None:
    for name in ("../model.json", "sub/model.json", "manifest.json"):
        with pytest.raises(InvalidModelId):
            store.save_files("m", "v1", {name: b"{}"}, "json")


def test_unknown_model_is_not_found(store: ModelStore) -> None:
    with pytest.raises(ModelNotFound):
        store.load_torch("nope")
    with pytest.raises(ModelNotFound):
        store.read_verified("nope", "v1")


def test_version_without_manifest_is_invisible(store: ModelStore, tmp_path) -> None:
    """A crash mid-save leaves files but no manifest: nobody can load it."""
    (tmp_path / "m" / "v1").mkdir(parents=True)
    (tmp_path / "m" / "v1" / "model.json").write_text("{}")
    assert store.versions("m") == []
    assert not store.exists("m", "v1")


def test_s3_store_against_a_local_s3_server() -> None:
    """s3:// through moto's S3-compatible server on loopback (no cloud, no network)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3
    import torch

    from tests.conftest import free_port

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(
            Bucket="models"
        )
        opts = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        s3 = ModelStore("s3://models/cookbook", opts)
        s3.save_torch("digits", "v1", {"w": torch.ones(3)}, {"note": "s3"})
        s3.save_torch("digits", "v2", {"w": torch.full((3,), 2.0)})
        assert s3.versions("digits") == ["v1", "v2"]
        sd, ref = s3.load_torch("digits")
        assert ref.version == "v2" and torch.equal(sd["w"], torch.full((3,), 2.0))
        assert ref.uri == "s3://models/cookbook/digits/v2"
        # Tamper through the S3 API: the digest check still catches it.
        raw = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds)
        raw.put_object(Bucket="models", Key="cookbook/digits/v1/model.safetensors", Body=b"x")
        with pytest.raises(IntegrityError):
            s3.load_torch("digits", "v1")
    finally:
        server.stop()
