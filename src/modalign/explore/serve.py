"""``modalign explore --serve``: the explore page on a local server, with a query box.

The server (the standard library's ``ThreadingHTTPServer``) binds to 127.0.0.1 unless another
host is asked for, serves the page at ``/`` and answers ``POST /query`` with a JSON body
``{"modality": "text", "text": "..."}`` or ``{"modality": "image", "image": "<data URL>"}``: the
model encodes the query, and the reply holds its map position and its top-k per modality in
the native space (:meth:`modalign.explore.build.ExploreSpace.query`). Ctrl-C stops it.

Examples:
    (Not run as a doctest: it starts a server.)

    >>> server = make_server(page_html, space, encode)  # doctest: +SKIP
    >>> server.server_address[0]  # doctest: +SKIP
    '127.0.0.1'
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from modalign.errors import ModalignError
from modalign.explore.build import ExploreSpace

__all__ = ["MAX_BODY_BYTES", "QueryEncoder", "make_server", "model_encoder", "serve_forever"]

MAX_BODY_BYTES = 16 << 20
"""Largest accepted query body (an uploaded image as a data URL)."""

QueryEncoder = Callable[[str, Any], np.ndarray]
"""``encode(modality, value)``: a text string or a PIL image -> one joint-space vector."""


def model_encoder(model: Any) -> QueryEncoder:
    """A :data:`QueryEncoder` running ``model.encode`` (tower, head, normalisation)."""

    def encode(modality: str, value: Any) -> np.ndarray:
        if modality not in model.modalities:
            raise ModalignError(f"query: the model has no {modality!r} tower "
                                f"(it has {model.modalities})")
        return model.encode(modality, [value])[0].numpy()

    return encode


def _decode_image(data_url: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    _, _, payload = data_url.partition("base64,")
    try:
        raw = base64.b64decode(payload or data_url, validate=True)
        im = Image.open(io.BytesIO(raw))
        im.load()
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise ModalignError(f"query: 'image' is not a readable image ({e})") from e
    return im


def answer_query(body: dict[str, Any], space: ExploreSpace, encode: QueryEncoder
                 ) -> dict[str, Any]:
    """The reply to one query body (see the module docstring); raises ``ModalignError``."""
    modality = body.get("modality")
    if modality == "text":
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ModalignError("query: 'text' must be a non-empty string")
        value: Any = text
    elif modality == "image":
        image = body.get("image")
        if not isinstance(image, str):
            raise ModalignError("query: 'image' must be a base64 data URL")
        value = _decode_image(image)
    else:
        raise ModalignError(f"query: 'modality' must be 'text' or 'image', got {modality!r}")
    vector = np.asarray(encode(modality, value), dtype=np.float32).reshape(-1)
    return {"modality": modality, **space.query(vector)}


def make_server(page_html: str, space: ExploreSpace, encode: QueryEncoder, *,
                host: str = "127.0.0.1", port: int = 8765, quiet: bool = True
                ) -> ThreadingHTTPServer:
    """A server (not yet started) for the page and its query endpoint; ``port=0`` picks one."""
    page = page_html.encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        server_version = "modalign-explore"

        def log_message(self, format: str, *args: Any) -> None:
            if not quiet:
                super().log_message(format, *args)

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict[str, Any]) -> None:
            self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
            else:
                self._json(404, {"error": f"no such page {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/query":
                self._json(404, {"error": f"no such endpoint {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY_BYTES:
                self._json(413, {"error": f"query body must be 0..{MAX_BODY_BYTES} bytes"})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ModalignError("query: expected a JSON object")
                self._json(200, answer_query(body, space, encode))
            except (ModalignError, json.JSONDecodeError) as e:
                self._json(400, {"error": str(e)})
            except Exception as e:  # a tower failure must not kill the server
                self._json(500, {"error": f"{type(e).__name__}: {e}"})

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise ModalignError(f"--port {port} on {host}: cannot listen ({e.strerror or e})") from e


def serve_forever(server: ThreadingHTTPServer) -> None:
    """Serve until Ctrl-C, then close the socket."""
    host, port = server.server_address[:2]
    host = host.decode() if isinstance(host, bytes) else host
    print(f"modalign explore: serving on http://{host}:{port}/ (Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("modalign explore: stopped", file=sys.stderr)
    finally:
        server.server_close()
