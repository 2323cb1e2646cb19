"""A headless Chromium driven over the DevTools protocol on a pipe (no websocket library):
real mouse clicks and key presses on a page, for the rating page's browser test."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from pathlib import Path


class Chromium:
    """One headless browser with one page; ``call`` sends a DevTools command to it."""

    def __init__(self, executable: str, profile: Path):
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()
        # the protocol's fds are 3 (commands) and 4 (replies) in the child: move ours out of
        # the way first, so the dup2 below never overwrites one of them
        high_in = fcntl.fcntl(to_chrome, fcntl.F_DUPFD_CLOEXEC, 10)
        high_out = fcntl.fcntl(from_chrome, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome)
        os.close(from_chrome)

        def child() -> None:
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=child, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(high_in)
        os.close(high_out)
        self._buffer, self._next, self.session = b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]

    def call(self, method: str, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _message(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError("the browser closed its pipe")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        """Poll ``expression`` until it is truthy; returns its value.  One that throws counts
        as false until the timeout (a page still loading has no elements yet)."""
        end, error = time.monotonic() + timeout, None
        while time.monotonic() < end:
            try:
                value = self.evaluate(expression)
            except RuntimeError as exc:
                value, error = None, exc
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{expression} stayed false for {timeout} s (last error: {error})")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def click(self, selector: str) -> None:
        """A real left click at the middle of the element."""
        box = self.wait_for(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            "?.getBoundingClientRect(); return r && r.width ? "
                            "[r.x + r.width / 2, r.y + r.height / 2] : null; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1],
                      button="left", clickCount=1)

    def press(self, key: str) -> None:
        """A real key press: down, with the character typed, and up."""
        code = 8 if key == "Backspace" else ord(key.upper())
        self.call("Input.dispatchKeyEvent", type="keyDown", key=key, windowsVirtualKeyCode=code,
                  **({"text": key} if len(key) == 1 else {}))
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key, windowsVirtualKeyCode=code)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._read)
        os.close(self._write)
