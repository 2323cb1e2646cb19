"""Stage ``rate``: people rate unit labels (SEMANTICS.md §11), as in the paper's §3.1.

A page on 127.0.0.1 shows, unit by unit, the unit's top images with its mask and the label
the dissection gave it; the rater answers yes, no or skip (buttons or the keys y, n, s;
backspace goes back one unit).  Each answer is written before the page moves on: the
rater's rows of the layer are rewritten atomically with it, so a closed browser or a killed
server loses at most the answer in flight, and a restarted server shows every answer given.
One process serves every rater; each rater's answers are their own rows.
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qs, unquote

import jinja2
import pandas as pd

from stages.pages.strips import ImageCache, render_tile, strip_image
from stages.tally.torch_masks import unit_mask
from stages.thresholds.top_images import TopImages
from storage.artifacts import Artifact
from storage.tables import write_partition

log = logging.getLogger("netdissect")

ANSWERS = ("yes", "no", "skip")
RATER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_BODY = 4096
TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("stages", "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined,
)


@dataclass(frozen=True)
class RatedLayer:
    """One layer's units to rate and where their images and answers live."""

    name: str  # shown and used in URLs: "<model>/<layer>[<basis>]"
    units: pd.DataFrame  # unit, label, concept, category, iou, threshold
    top: TopImages
    images: ImageCache
    ratings: Callable[[str], Artifact]  # rater -> the artifact of their rows of this layer
    keys: dict  # the row keys every rating row of the layer carries


class RequestError(Exception):
    """A request that cannot be taken: its HTTP status and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RatingBook:
    """Every rater's answers, kept in memory and written through on each answer."""

    def __init__(self, layers: Sequence[RatedLayer], top_n: int, thumb: int):
        self.layers = {layer.name: layer for layer in layers}
        self.top_n, self.thumb = top_n, thumb
        self.lock = threading.Lock()
        self.rows: dict[tuple[str, str], pd.DataFrame] = {}

    def _rows(self, layer: RatedLayer, rater: str) -> pd.DataFrame:
        key = (layer.name, rater)
        if key not in self.rows:
            artifact = layer.ratings(rater)
            self.rows[key] = (pd.read_parquet(artifact.path) if artifact.is_current()
                              else pd.DataFrame())
        return self.rows[key]

    def items(self, rater: str) -> list[dict]:
        """Every unit to rate, in layer order, with this rater's answer so far (or None)."""
        check_rater(rater)
        out = []
        with self.lock:
            for layer in self.layers.values():
                given = self._rows(layer, rater)
                answer = dict(zip(given["unit"], given["answer"], strict=True)) if len(
                    given) else {}
                for row in layer.units.itertuples(index=False):
                    out.append({"layer": layer.name, "unit": int(row.unit),
                                "concept": str(row.concept), "category": str(row.category),
                                "iou": float(row.iou), "answer": answer.get(int(row.unit))})
        return out

    def answer(self, body: dict) -> int:
        """Record one answer (replacing the rater's earlier answer for that unit); returns
        how many of the layer's units the rater has answered."""
        rater, layer, unit, answer = (body.get(k) for k in ("rater", "layer", "unit", "answer"))
        check_rater(rater)
        if layer not in self.layers:
            raise RequestError(404, f"unknown layer {layer!r}")
        rated = self.layers[layer]
        if not isinstance(unit, int) or unit not in set(rated.units["unit"]):
            raise RequestError(404, f"layer {layer}: no unit {unit!r} to rate")
        if answer not in ANSWERS:
            raise RequestError(400, f"answer {answer!r}: give one of {', '.join(ANSWERS)}")
        label = rated.units.set_index("unit").loc[unit]
        row = {**rated.keys, "unit": unit, "label": int(label["label"]),
               "concept": str(label["concept"]), "rater": rater, "answer": answer,
               "time": datetime.now(UTC).isoformat(timespec="seconds")}
        with self.lock:
            given = self._rows(rated, rater)
            kept = given[given["unit"] != unit] if len(given) else given
            frame = pd.concat([kept, pd.DataFrame([row])], ignore_index=True)
            frame = frame.sort_values("unit", kind="stable").reset_index(drop=True)
            write_partition(rated.ratings(rater), frame.copy())
            self.rows[(rated.name, rater)] = frame
        return len(frame)

    def strip(self, layer: str, unit: int) -> bytes:
        """The unit's top images with its mask, as JPEG."""
        if layer not in self.layers or unit not in set(self.layers[layer].units["unit"]):
            raise RequestError(404, f"no unit {unit} of layer {layer!r} to rate")
        rated = self.layers[layer]
        threshold = float(rated.units.set_index("unit").loc[unit, "threshold"])
        tiles = []
        for j in range(min(self.top_n, rated.top.index.shape[1])):
            image = rated.images(int(rated.top.index[unit, j]))
            mask = unit_mask(rated.top.maps[unit, j], threshold, image.shape[:2])
            tiles.append(render_tile(image, mask, self.thumb))
        out = io.BytesIO()
        strip_image(tiles).save(out, format="JPEG", quality=88)
        return out.getvalue()


def check_rater(rater: object) -> None:
    if not isinstance(rater, str) or not RATER.match(rater):
        raise RequestError(400, f"rater {rater!r}: give a name of letters, digits, '_', '.' "
                                "or '-' (at most 64)")


def handler(book: RatingBook, rater: str) -> type[http.server.BaseHTTPRequestHandler]:
    """The request handler of a rating server (``rater``: the name the page starts with)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the pipeline's log says what matters
            pass

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, value: object) -> None:
            self._send(status, json.dumps(value).encode(), "application/json")

        def _guarded(self, work: Callable[[], None]) -> None:
            try:
                work()
            except RequestError as exc:
                self._json(exc.status, {"error": str(exc)})

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path, _, query = self.path.partition("?")

            def work() -> None:
                if path == "/":
                    page = TEMPLATES.get_template("rate.html.j2").render(rater=rater)
                    self._send(200, page.encode(), "text/html; charset=utf-8")
                elif path == "/api/items":
                    rater_asked = parse_qs(query).get("rater", [""])[0]
                    self._json(200, book.items(rater_asked))
                elif m := re.fullmatch(r"/strip/(.+)/(\d+)\.jpg", path):
                    self._send(200, book.strip(unquote(m[1]), int(m[2])), "image/jpeg")
                else:
                    raise RequestError(404, f"no page {path}")

            self._guarded(work)

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            def work() -> None:
                if self.path != "/api/answer":
                    raise RequestError(404, f"no endpoint {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    raise RequestError(400, f"a body of 1 to {MAX_BODY} bytes, not {length}")
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    raise RequestError(400, "the body is not JSON") from None
                if not isinstance(body, dict):
                    raise RequestError(400, "the body is not a JSON object")
                self._json(200, {"answered": book.answer(body)})

            self._guarded(work)

    return Handler


def serve(book: RatingBook, host: str, port: int, rater: str,
          ready: Callable[[str], None] = print) -> None:
    """Serve the rating page until interrupted; ``ready`` gets its URL."""
    server = http.server.ThreadingHTTPServer((host, port), handler(book, rater))
    url = f"http://{host}:{server.server_address[1]}/"
    ready(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def units_to_rate(units: pd.DataFrame, detectors_only: bool) -> pd.DataFrame:
    """The units of a layer to rate (detectors, or all), best IoU first."""
    chosen = units[units["is_detector"]] if detectors_only else units
    return chosen.sort_values(["iou", "unit"], ascending=[False, True]).reset_index(drop=True)

