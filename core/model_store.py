"""Versioned model artifacts under a ``file://`` or ``s3://`` URI, safe formats only.

Layout: ``<root>/<name>/<version>/<files...>`` plus ``manifest.json`` holding the sha256 of
every file, the format and free-form metadata (metrics, training data, architecture).

Guarantees a user can rely on:
- names and versions are single safe path segments, so no id can escape the root;
- only formats that cannot run code on load are accepted (safetensors, XGBoost UBJ/JSON,
  skops, ONNX, JSON); pickle streams and zip files holding a pickle are refused on save and
  on load;
- every file is checked against the manifest before it is loaded (tampered -> IntegrityError);
- the manifest is written last, and a version without one is invisible, so a crash while
  saving never leaves a half-written version that a replica could load.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

from core.errors import (
    IntegrityError,
    InvalidModelId,
    ModelNotFound,
    UnsafeFormatError,
)

MANIFEST = "manifest.json"
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# format -> file suffixes it may contain. Anything else (.pkl, .pt, .joblib, ...) is refused.
SAFE_FORMATS: dict[str, tuple[str, ...]] = {
    "safetensors": (".safetensors", ".json"),
    "xgboost": (".ubj", ".json"),
    "skops": (".skops", ".json"),
    "onnx": (".onnx", ".json"),
    "json": (".json",),
}
# Module prefixes a skops artifact may instantiate. A type outside these is refused even if
# the manifest lists it: the manifest is data from storage, not a grant of trust.
SKOPS_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.", "builtins.", "collections.")


def validate_id(value: str, what: str = "model name") -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or ".." in value:
        raise InvalidModelId(
            f"{what} {value!r} is not allowed: use 1-64 characters of a-z, 0-9, '_', '-', '.' "
            "starting with a letter or digit (no '..', no '/')."
        )
    return value


def _natural_key(version: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_not_pickle(filename: str, data: bytes) -> None:
    """Refuse bytes that would execute code when unpickled (directly or inside a zip)."""
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        raise UnsafeFormatError(f"{filename} is a pickle stream; pickle is never loaded.")
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as exc:
            raise UnsafeFormatError(f"{filename} is a corrupt zip archive.") from exc
        if any(n.endswith((".pkl", ".pickle")) or n.endswith("/data.pkl") for n in names):
            raise UnsafeFormatError(
                f"{filename} is a zip holding a pickle (torch.save format?); "
                "save torch weights as safetensors instead."
            )


@dataclass(frozen=True)
class ModelRef:
    """Which artifact a replica loaded: report it in answers and metric tags."""

    name: str
    version: str
    format: str
    uri: str
    sha256: str  # digest of the manifest: one fingerprint for the whole version
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256[:12]}


class ModelStore:
    """A model store rooted at a ``file://`` or ``s3://`` URI (anything fsspec opens)."""

    def __init__(self, root_uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.root_uri = root_uri.rstrip("/")
        self._fs, self._root = fsspec.core.url_to_fs(self.root_uri, **dict(storage_options or {}))
        self._local = "file" in (
            self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
        )

    @classmethod
    def open(
        cls, uri: str | None = None, storage_options: Mapping[str, Any] | None = None
    ) -> ModelStore:
        """The store at ``uri``, or the configured one (``COOKBOOK_MODEL_STORE_*``) when None.

        Every pattern's args carry an optional ``model_store_uri``; this is the one place that
        turns it into a store.
        """
        if uri:
            return cls(uri, storage_options)
        from core.settings import get_settings

        s = get_settings()
        return cls(s.model_store_uri, s.model_store_options)

    def __repr__(self) -> str:
        return f"ModelStore({self.root_uri!r})"

    # ------------------------------------------------------------------ paths and listing
    def _path(self, *parts: str) -> str:
        return "/".join([self._root.rstrip("/"), *parts])

    def _version_dir(self, name: str, version: str) -> str:
        return self._path(validate_id(name), validate_id(version, "model version"))

    def exists(self, name: str, version: str) -> bool:
        return bool(self._fs.exists(self._version_dir(name, version) + "/" + MANIFEST))

    def versions(self, name: str) -> list[str]:
        base = self._path(validate_id(name))
        if not self._fs.exists(base):
            return []
        found = []
        for entry in self._fs.ls(base, detail=False):
            version = entry.rstrip("/").rsplit("/", 1)[-1]
            if _ID_RE.fullmatch(version) and self._fs.exists(f"{entry.rstrip('/')}/{MANIFEST}"):
                found.append(version)
        return sorted(found, key=_natural_key)

    def latest(self, name: str) -> str:
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"no versions of model {name!r} in {self.root_uri}")
        return versions[-1]

    def _resolve(self, name: str, version: str) -> str:
        return self.latest(name) if version == "latest" else validate_id(version, "model version")

    # ------------------------------------------------------------------ raw files
    def save_files(
        self,
        name: str,
        version: str,
        files: Mapping[str, bytes],
        fmt: str,
        metadata: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> ModelRef:
        """Write one version. Files first, manifest last (the manifest makes it visible)."""
        if fmt not in SAFE_FORMATS:
            raise UnsafeFormatError(
                f"format {fmt!r} is not allowed; use one of {sorted(SAFE_FORMATS)}."
            )
        if not files:
            raise ValueError("an artifact needs at least one file")
        vdir = self._version_dir(name, version)
        if self.exists(name, version) and not overwrite:
            raise FileExistsError(
                f"{name}/{version} already exists in {self.root_uri}; versions are immutable."
            )
        digests: dict[str, str] = {}
        for filename, data in files.items():
            if filename == MANIFEST or not _FILE_RE.fullmatch(filename) or ".." in filename:
                raise InvalidModelId(f"artifact file name {filename!r} is not allowed.")
            if not filename.endswith(SAFE_FORMATS[fmt]):
                raise UnsafeFormatError(
                    f"{filename}: format {fmt!r} only holds {', '.join(SAFE_FORMATS[fmt])} files."
                )
            check_not_pickle(filename, data)
            digests[filename] = _sha256(data)
        manifest = {
            "name": name,
            "version": version,
            "format": fmt,
            "files": digests,
            "metadata": dict(metadata or {}),
            "created_at": time.time(),
        }
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        if overwrite and self._fs.exists(vdir):
            self._fs.rm(vdir, recursive=True)
        self._fs.makedirs(vdir, exist_ok=True)
        for filename, data in files.items():
            self._atomic_write(f"{vdir}/{filename}", data)
        self._atomic_write(f"{vdir}/{MANIFEST}", manifest_bytes)
        return self._ref(manifest, manifest_bytes)

    def _atomic_write(self, path: str, data: bytes) -> None:
        if self._local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with self._fs.open(tmp, "wb") as f:
                f.write(data)
            self._fs.mv(tmp, path)
        else:  # object stores publish a PUT atomically
            with self._fs.open(path, "wb") as f:
                f.write(data)

    def _ref(self, manifest: Mapping[str, Any], manifest_bytes: bytes) -> ModelRef:
        return ModelRef(
            name=manifest["name"],
            version=manifest["version"],
            format=manifest["format"],
            uri=f"{self.root_uri}/{manifest['name']}/{manifest['version']}",
            sha256=_sha256(manifest_bytes),
            metadata=manifest.get("metadata", {}),
        )

    def read_manifest(self, name: str, version: str = "latest") -> tuple[dict[str, Any], bytes]:
        version = self._resolve(name, version)
        path = self._version_dir(name, version) + "/" + MANIFEST
        try:
            with self._fs.open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError as exc:
            raise ModelNotFound(f"model {name}/{version} not found in {self.root_uri}") from exc
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise IntegrityError(f"manifest of {name}/{version} is not valid JSON") from exc
        if manifest.get("name") != name or manifest.get("version") != version:
            raise IntegrityError(f"manifest of {name}/{version} names another artifact")
        if manifest.get("format") not in SAFE_FORMATS:
            fmt = manifest.get("format")
            raise UnsafeFormatError(f"{name}/{version} has unsafe format {fmt!r}")
        return manifest, raw

    def read_verified(
        self, name: str, version: str = "latest"
    ) -> tuple[dict[str, bytes], ModelRef]:
        """Every file of a version, each checked against the manifest's sha256."""
        manifest, raw = self.read_manifest(name, version)
        vdir = self._version_dir(name, manifest["version"])
        out: dict[str, bytes] = {}
        for filename, digest in manifest["files"].items():
            if not _FILE_RE.fullmatch(filename) or ".." in filename:
                raise InvalidModelId(f"manifest lists a bad file name {filename!r}")
            if not filename.endswith(SAFE_FORMATS[manifest["format"]]):
                raise UnsafeFormatError(f"{filename} is not a {manifest['format']} file")
            try:
                with self._fs.open(f"{vdir}/{filename}", "rb") as f:
                    data = f.read()
            except FileNotFoundError as exc:
                raise IntegrityError(f"{name}/{manifest['version']} is missing {filename}") from exc
            if _sha256(data) != digest:
                raise IntegrityError(
                    f"{name}/{manifest['version']}/{filename} does not match its manifest "
                    "(tampered or partially written); refusing to load it."
                )
            check_not_pickle(filename, data)
            out[filename] = data
        return out, self._ref(manifest, raw)

    # ------------------------------------------------------------------ torch (safetensors)
    def save_torch(
        self,
        name: str,
        version: str,
        state_dict: Mapping[str, Any],
        metadata: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> ModelRef:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        return self.save_files(
            name, version, {"model.safetensors": save(tensors)}, "safetensors", metadata, **kw
        )

    def load_torch(self, name: str, version: str = "latest") -> tuple[dict[str, Any], ModelRef]:
        from safetensors.torch import load

        files, ref = self.read_verified(name, version)
        if ref.format != "safetensors" or "model.safetensors" not in files:
            raise UnsafeFormatError(f"{name}/{ref.version} is not a safetensors artifact")
        return load(files["model.safetensors"]), ref

    # ------------------------------------------------------------------ xgboost (UBJ)
    def save_xgboost(
        self,
        name: str,
        version: str,
        model: Any,
        metadata: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> ModelRef:
        booster = model.get_booster() if hasattr(model, "get_booster") else model
        raw = bytes(booster.save_raw(raw_format="ubj"))
        return self.save_files(name, version, {"model.ubj": raw}, "xgboost", metadata, **kw)

    def load_xgboost(self, name: str, version: str = "latest") -> tuple[Any, ModelRef]:
        import xgboost

        files, ref = self.read_verified(name, version)
        if ref.format != "xgboost":
            raise UnsafeFormatError(f"{name}/{ref.version} is not an XGBoost artifact")
        booster = xgboost.Booster()
        key = "model.ubj" if "model.ubj" in files else "model.json"
        booster.load_model(bytearray(files[key]))
        return booster, ref

    # ------------------------------------------------------------------ scikit-learn (skops)
    def save_sklearn(
        self,
        name: str,
        version: str,
        estimator: Any,
        metadata: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> ModelRef:
        import skops.io

        data = skops.io.dumps(estimator)
        meta = dict(metadata or {})
        meta["skops_types"] = sorted(skops.io.get_untrusted_types(data=data))
        return self.save_files(name, version, {"model.skops": data}, "skops", meta, **kw)

    def load_sklearn(self, name: str, version: str = "latest") -> tuple[Any, ModelRef]:
        import skops.io

        files, ref = self.read_verified(name, version)
        if ref.format != "skops":
            raise UnsafeFormatError(f"{name}/{ref.version} is not a skops artifact")
        data = files["model.skops"]
        needed = skops.io.get_untrusted_types(data=data)
        refused = [t for t in needed if not t.startswith(SKOPS_TRUSTED_PREFIXES)]
        if refused:
            raise UnsafeFormatError(
                f"{name}/{ref.version} would instantiate untrusted types {refused}; refusing."
            )
        return skops.io.loads(data, trusted=needed), ref
