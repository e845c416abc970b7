"""Uploads as the HTTP layer sees them: a byte stream read under a cap and a deadline, then
decoded by :func:`fewshot.model.image_input.decode_image` (the pyfunc flavour decodes with it too).

Every failure is an :class:`ImageRejected` carrying its HTTP status and error code:
400 empty body / bad multipart, 408 the body did not arrive in time, 413 too many bytes or
pixels, 415 not an image, 422 an image that does not decode or whose shape the detector
cannot take.
"""
from __future__ import annotations

import asyncio

from fewshot.model.image_input import DecodedImage, ImageError, decode_image

# multipart framing (boundaries, part headers) on top of the file itself
MULTIPART_OVERHEAD = 64 * 1024

STATUS = {
    "empty": (400, "empty_body"),
    "too_large": (413, "too_large"),
    "too_many_pixels": (413, "too_many_pixels"),
    "not_an_image": (415, "not_an_image"),
    "corrupt": (422, "corrupt_image"),
    "bad_shape": (422, "unsupported_shape"),
}


class ImageRejected(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


async def read_body(request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, refused as soon as it passes ``max_bytes`` (whatever
    Content-Length says, chunked or not) or when it has not all arrived in ``timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise ImageRejected(413, "too_large", f"the body is {int(declared)} bytes; the limit is {max_bytes}")
    chunks: list[bytes] = []
    total = 0

    async def _read() -> None:
        nonlocal total
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise ImageRejected(413, "too_large", f"the body passed {max_bytes} bytes (the limit) "
                                                      "and was not read further")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(_read(), timeout=timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise ImageRejected(408, "read_timeout", f"the body did not arrive within {timeout_s:g} s "
                                                 f"({total} bytes read)") from None
    return b"".join(chunks)


async def image_bytes(request, max_bytes: int, timeout_s: float) -> bytes:
    """The uploaded image's bytes: the ``file`` part of a multipart body, or the raw body."""
    from starlette.requests import Request

    ctype = request.headers.get("content-type", "")
    multipart = ctype.lower().startswith("multipart/form-data")
    body = await read_body(request, max_bytes + (MULTIPART_OVERHEAD if multipart else 0), timeout_s)
    if not multipart:
        if len(body) > max_bytes:
            raise ImageRejected(413, "too_large", f"upload is {len(body)} bytes; the limit is {max_bytes}")
        return body

    sent = False

    async def replay():  # the form parser reads the body we already hold, nothing more
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive=replay).form(max_files=1, max_fields=8)
    except Exception as err:  # malformed multipart, too many parts
        raise ImageRejected(400, "bad_multipart", f"the multipart body does not parse: {err}") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ImageRejected(400, "missing_file", "the multipart body has no file field named 'file'")
        data = await upload.read()
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise ImageRejected(413, "too_large", f"upload is {len(data)} bytes; the limit is {max_bytes}")
    return data


def decode_upload(data: bytes, max_bytes: int, max_pixels: int,
                  model_size: tuple[int, int] | None = None) -> DecodedImage:
    try:
        return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, model_size=model_size)
    except ImageError as err:
        status, code = STATUS.get(err.kind, (422, err.kind))
        raise ImageRejected(status, code, err.message) from None
