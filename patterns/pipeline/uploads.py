"""Reading images out of an HTTP request: raw PNG/JPEG bodies and multipart uploads.

Sizes are checked before a body or a part is read into memory: a raw body on its declared
Content-Length, a multipart part on the size the parser spooled. Every refusal is a 4xx from
``core.errors`` with a sentence.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from core.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from patterns.pipeline.flow import too_big
from patterns.pipeline.preprocess import ImageLimits

RAW_TYPES = ("image/png", "image/jpeg", "image/jpg")

_BINARY = {"type": "string", "format": "binary", "minLength": 1}  # an empty file: 400
# OpenAPI request bodies (the routes read the raw request, so FastAPI cannot infer them).
IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": _BINARY},
            "image/jpeg": {"schema": _BINARY},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": _BINARY},
                    "required": ["image"],
                }
            },
        },
    }
}
BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": _BINARY, "minItems": 1}},
                    "required": ["images"],
                }
            }
        },
    }
}


def image_rules(limits: ImageLimits) -> str:
    """What the decoder checks once it has an image, which a schema cannot say of bytes: the
    routes' descriptions state it (with this replica's numbers), and its status is in their
    documented errors."""
    side = limits.min_side
    return (
        f"Each image is a PNG or JPEG of at least {side}x{side} pixels (smaller: 422), at most "
        f"{limits.max_side} pixels a side and {limits.max_pixels:,} pixels in all (larger, or a "
        "decompression bomb: 413); a file that does not decode is a 422."
    )


def document_limits(
    doc: dict[str, Any], *, max_image_bytes: int, max_files: int, limits: ImageLimits
) -> None:
    """The byte, file and pixel limits the routes enforce, in the served OpenAPI ``doc``."""
    for path in ("/read", "/read/batch"):
        operation = doc["paths"][path]["post"]
        operation["description"] = image_rules(limits)
        for media, spec in operation["requestBody"]["content"].items():
            schema = spec["schema"]
            if media != "multipart/form-data":
                schema["maxLength"] = max_image_bytes
                continue
            for prop in schema["properties"].values():
                target = prop.get("items", prop)
                target["maxLength"] = max_image_bytes
                if "items" in prop:
                    prop["maxItems"] = max_files


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def one_image(request: Request, *, max_image_bytes: int, max_files: int) -> bytes:
    """The image of a ``/read`` request: a raw PNG/JPEG body or one multipart file."""
    ctype = content_type(request)
    if ctype == "multipart/form-data":
        files = await files_of(
            request, limit=max_files, max_image_bytes=max_image_bytes, single=True
        )
        if not files:
            raise BadRequest(
                "The multipart upload holds no file; attach the image in field 'image'."
            )
        return files[0][1]
    if ctype in RAW_TYPES:
        # Refuse an oversized image on its declared length, before reading the body.
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_image_bytes:
            raise too_big("", int(declared), max_image_bytes)
        return await request.body()
    got = ctype or "no Content-Type"
    raise UnsupportedMediaType(
        f"Got {got}; send the image as image/png or image/jpeg bytes, or as "
        "multipart/form-data with the file in field 'image'."
    )


async def batch_of_images(
    request: Request, *, max_image_bytes: int, max_files: int
) -> list[tuple[str, bytes]]:
    """The images of a ``/read/batch`` request (multipart, field ``images``), with names."""
    ctype = content_type(request)
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType(
            "/read/batch takes multipart/form-data with one file per image "
            f"(field 'images'); got {ctype or 'no Content-Type'}."
        )
    files = await files_of(request, limit=max_files, max_image_bytes=max_image_bytes)
    if not files:
        raise BadRequest("The batch holds no files; attach images in the 'images' field.")
    return files


async def files_of(
    request: Request, *, limit: int, max_image_bytes: int, single: bool = False
) -> list[tuple[str, bytes]]:
    try:
        # max_files bounds the parser itself; the limit below gives the sentence.
        form = await request.form(max_files=limit + 32, max_fields=limit + 32)
    except Exception as exc:  # malformed multipart: missing boundary, cut-off parts...
        raise BadRequest(f"The multipart body could not be parsed ({exc}).") from exc
    files = [v for _, v in form.multi_items() if hasattr(v, "read")]
    if len(files) > 1 and single:
        raise BadRequest(
            f"The multipart upload holds {len(files)} files; /read takes one "
            "(use /read/batch for several)."
        )
    if len(files) > limit:
        raise PayloadTooLarge(
            f"{len(files)} images in one request; send at most {limit} per request."
        )
    out = []
    for i, upload in enumerate(files):
        name = upload.filename or "upload"
        # The parser has spooled the part already; refuse it before reading it into memory.
        if upload.size is not None and upload.size > max_image_bytes:
            where = "" if single else f"Image {i + 1} ({name}): "
            raise too_big(where, upload.size, max_image_bytes)
        out.append((name, await upload.read()))
    return out
