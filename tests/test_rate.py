"""The rating page (SEMANTICS.md §11): a real server process and a real headless browser
(mouse clicks and key presses over the DevTools protocol), a server killed mid-session and
restarted, a second rater, and requests that must change nothing."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, cli, cli_env

TINY = ["model=custom", "model.factory=tests.tiny_models:tiny_cnn", "model.weights=none",
        "model.layers=[conv3]", "cluster=none", "progress=false", "scoring.quantile=0.02",
        "dataset.block_size=8"]
LAYER = "tiny_cnn/conv3"


@pytest.fixture(scope="module")
def scored(tmp_path_factory, synthetic_root) -> list[str]:
    """The arguments of a workdir where stage=iou has run (rate then builds nothing)."""
    from pipeline.run import compose_config, run

    wd = tmp_path_factory.mktemp("rate") / "wd"
    args = [f"workdir={wd}", f"dataset.path={synthetic_root}", *TINY]
    run(compose_config([*args, "stage=iou"]))
    return args


class Server:
    """``stage=rate`` in its own process, on a free port."""

    def __init__(self, args: list[str], rater: str = "alice"):
        self.proc = subprocess.Popen(
            cli(*args, "stage=rate", "rate.port=0", f"rate.rater={rater}",
                "rate.detectors_only=false"),
            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stdout:
            if found := re.search(r"at (http://127\.0\.0\.1:\d+/)", line):
                self.url = found[1]
                return
        raise RuntimeError(f"the server did not start: {self.proc.stderr.read()[-2000:]}")

    def post(self, body: bytes | dict) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + "api/answer", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)


def ratings(args: list[str]) -> pd.DataFrame:
    from storage.tables import read_table

    workdir = Path(args[0].split("=", 1)[1])
    frame = read_table(workdir / "results", "ratings")
    return frame.sort_values(["rater", "unit"]).reset_index(drop=True) if len(frame) else frame


def test_answers_from_the_browser_survive_a_killed_server(scored, tmp_path):
    from tests.cdp import Chromium

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not found on PATH (.ci/run installs Debian's chromium package)")
    server = Server(scored)
    browser = Chromium(chromium, tmp_path / "profile")
    try:
        browser.open(server.url)
        label = "document.getElementById('label').textContent"
        unit = "Number(document.getElementById('item').dataset.unit)"
        browser.wait_for(f"{label} && document.getElementById('strip').naturalWidth > 0")
        given = []
        for action, answer in ((lambda: browser.click("#yes"), "yes"),
                               (lambda: browser.press("n"), "no"),
                               (lambda: browser.press("s"), "skip")):
            given.append((browser.evaluate(unit), answer))
            action()
            browser.wait_for(f"document.getElementById('status').textContent === "
                             f"'saved: unit {given[-1][0]} {answer}'")
        rows = ratings(scored)
        assert list(zip(rows["unit"], rows["answer"], strict=True)) == sorted(given)
        assert set(rows["rater"]) == {"alice"} and set(rows["layer"]) == {"conv3"}
        assert {"model_id", "concept", "label", "time", "basis", "iou_threshold"} <= set(rows)
        assert browser.evaluate("document.getElementById('progress').textContent").startswith(
            "3 of 16")

        server.kill()  # mid-session: the answers given are on disk
        server = Server(scored)
        browser.open(server.url)
        browser.wait_for("document.getElementById('progress').textContent.startsWith('3 of')")
        fourth = browser.evaluate(unit)
        assert fourth not in [u for u, _ in given]
        browser.press("Backspace")  # back to the last answered unit, shown with its answer
        browser.wait_for("document.getElementById('where').textContent.includes("
                         "'your answer: skip')")
        browser.press("n")  # changes that answer
        browser.wait_for(f"document.getElementById('status').textContent === "
                         f"'saved: unit {given[2][0]} no'")
        browser.press("y")
        browser.wait_for(f"document.getElementById('status').textContent === "
                         f"'saved: unit {fourth} yes'")
        rows = ratings(scored)
        expected = sorted([*given[:2], (given[2][0], "no"), (fourth, "yes")])
        assert list(zip(rows["unit"], rows["answer"], strict=True)) == expected
    finally:
        browser.close()
        server.stop()


def test_a_second_rater_is_kept_apart_and_bad_requests_change_nothing(scored):
    server = Server(scored, rater="bob")
    try:
        status, items = server.get("api/items?rater=bob")
        assert status == 200
        first = json.loads(items)[0]
        assert server.post({"rater": "bob", "layer": LAYER, "unit": first["unit"],
                            "answer": "no"}) == (200, {"answered": 1})
        before = ratings(scored)
        bob = before[before["rater"] == "bob"]
        assert list(zip(bob["unit"], bob["answer"], strict=True)) == [(first["unit"], "no")]
        bad = [({"rater": "bob", "layer": LAYER, "unit": 999, "answer": "yes"}, 404, "no unit"),
               ({"rater": "bob", "layer": "nope/conv9", "unit": 0, "answer": "yes"}, 404,
                "unknown layer"),
               ({"rater": "bob", "layer": LAYER, "unit": first["unit"], "answer": "maybe"}, 400,
                "answer 'maybe'"),
               ({"rater": "../x", "layer": LAYER, "unit": first["unit"], "answer": "yes"}, 400,
                "rater '../x'"),
               ({"rater": "bob", "layer": LAYER, "unit": "3", "answer": "yes"}, 404, "no unit"),
               (b"{not json", 400, "not JSON"), (b"[1, 2]", 400, "not a JSON object")]
        for body, status, message in bad:
            got, reply = server.post(body)
            assert got == status and message in reply["error"], (body, got, reply)
        assert server.get("nowhere")[0] == 404
        assert server.get("strip/tiny_cnn%2Fconv3/999.jpg")[0] == 404
        assert server.get("api/items?rater=")[0] == 400
        pd.testing.assert_frame_equal(ratings(scored), before)
        status, strip = server.get(f"strip/tiny_cnn%2Fconv3/{first['unit']}.jpg")
        assert status == 200 and strip[:2] == b"\xff\xd8"  # a JPEG
    finally:
        server.stop()
