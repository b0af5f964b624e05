"""Open an evaluation report in headless Chromium: check that its videos play and save a screenshot.

The report folder is served from a 127.0.0.1 HTTP server (``http.server`` in a thread, with
byte ranges, as media players expect) and Chromium is driven over the DevTools protocol on
``--remote-debugging-pipe`` (NUL-separated JSON on fds 3 and 4), so nothing beyond a local
Chromium binary is needed. A ``<video>`` counts as loaded when it has metadata and a decoded
frame (``readyState >= 2`` and ``videoWidth > 0``); one that errors (e.g. a codec Chromium lacks)
or times out is reported with the browser's own error message.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome",
                  "headless_shell")
# Without the networking switches Chromium waits on the (closed) network at start-up.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--mute-audio",
                  "--autoplay-policy=no-user-gesture-required", "--hide-scrollbars")

_VIDEO_STATE_JS = """JSON.stringify([...document.querySelectorAll('video')].map(v => ({
  src: v.getAttribute('src') || v.currentSrc, readyState: v.readyState, width: v.videoWidth,
  height: v.videoHeight, duration: v.duration,
  error: v.error ? `MediaError ${v.error.code}: ${v.error.message || ''}` : null})))"""


class ChromiumNotFound(FileNotFoundError):
    """No Chromium/Chrome executable on this machine."""


class BrowserError(RuntimeError):
    """Chromium exited, or did not answer a DevTools command in time."""


@dataclass
class VideoState:
    """One ``<video>`` as the browser saw it."""
    src: str
    ready_state: int
    width: int
    height: int
    duration: float | None
    error: str | None

    @property
    def loaded(self) -> bool:
        return self.error is None and self.ready_state >= 2 and self.width > 0


@dataclass
class PageCheck:
    """What opening a report showed: every video's state, the screenshot, the page's errors."""
    url: str
    videos: list[VideoState]
    screenshot: Path | None
    console_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[VideoState]:
        return [v for v in self.videos if not v.loaded]

    def as_dict(self) -> dict:
        return {"url": self.url, "videos": len(self.videos), "videos_loaded": len(self.videos) - len(self.failed),
                "failed": [{"src": v.src, "ready_state": v.ready_state, "error": v.error or "timed out before "
                            "a frame was decoded"} for v in self.failed],
                "video_sizes": sorted({f"{v.width}x{v.height}" for v in self.videos if v.loaded}),
                "screenshot": str(self.screenshot) if self.screenshot else None,
                "console_errors": self.console_errors, "seconds": round(self.seconds, 2)}


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium executable: ``explicit``, else ``$CHROMIUM``, else a known name on PATH, else
    ``/usr/bin/chromium``. Raises :class:`ChromiumNotFound` saying how to get one."""
    for cand in (explicit, os.environ.get("CHROMIUM")):
        if cand:
            path = shutil.which(cand) or (cand if os.access(cand, os.X_OK) else None)
            if not path:
                raise ChromiumNotFound(f"Chromium not found at {cand!r} (from --chromium or $CHROMIUM)")
            return path
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    raise ChromiumNotFound("no Chromium found (looked for $CHROMIUM, " + ", ".join(CHROMIUM_NAMES) +
                           " on PATH, /usr/bin/chromium); install one, e.g. `apt-get install chromium`, "
                           "or point $CHROMIUM at a Chrome/Chromium binary")


class _RangeHandler(SimpleHTTPRequestHandler):
    """Static files with single ``Range: bytes=a-b`` requests answered as 206, quietly."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def send_head(self):  # type: ignore[override]
        rng = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not rng.startswith("bytes=") or "," in rng or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start_s, _, end_s = rng[6:].partition("-")
        try:
            start, end = (int(start_s), int(end_s) if end_s else size - 1) if start_s else (size - int(end_s), size - 1)
        except ValueError:
            return super().send_head()
        end = min(end, size - 1)
        if start < 0 or start > end:
            self.send_error(416, "Requested Range Not Satisfiable")
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return _Limited(f, end - start + 1)

    def end_headers(self) -> None:
        if not self.headers.get("Range"):
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()


class _Limited:
    """A file object that reads at most ``n`` bytes (what ``copyfile`` streams for a range)."""

    def __init__(self, f, n: int):
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size) if size else b""
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


@contextlib.contextmanager
def serve(directory: str | Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_RangeHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="report-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe``; one page (a flattened session)."""

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 900, timeout: float = 60.0):
        self.executable = find_chromium(executable)
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="expportrait-chromium-")
        cmd_r, self._cmd_w = os.pipe()          # we write commands; Chromium reads fd 3
        self._out_r, out_w = os.pipe()          # Chromium writes fd 4; we read
        # the child's ends above fd 9, so that moving them onto 3 and 4 cannot clobber one another
        cmd_r, out_w = (self._high(fd) for fd in (cmd_r, out_w))
        argv = [self.executable, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}", "about:blank"]
        # a tiny trampoline puts the pipe ends on fds 3 and 4, where Chromium expects them, and execs it
        hop = (f"import os, sys; os.dup2({cmd_r}, 3); os.dup2({out_w}, 4); os.close({cmd_r}); os.close({out_w}); "
               "os.execv(sys.argv[1], sys.argv[1:])")
        self.proc = subprocess.Popen([sys.executable, "-c", hop, *argv], pass_fds=(cmd_r, out_w),
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(cmd_r)
        os.close(out_w)
        self._next_id = 0
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.events: queue.Queue = queue.Queue()
        self.console_errors: list[str] = []
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        self.session: str | None = None
        self.size = (width, height)

    @staticmethod
    def _high(fd: int) -> int:
        import fcntl
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._out_r, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buf += chunk
                *messages, buf = buf.split(b"\0")
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        with self._lock:
                            q = self._replies.get(msg["id"])
                        if q is not None:
                            q.put(msg)
                    else:
                        self._note(msg)
                        self.events.put(msg)

    def _note(self, msg: dict) -> None:
        """Keep the page's console errors and uncaught exceptions."""
        params = msg.get("params", {})
        if msg.get("method") == "Runtime.exceptionThrown":
            self.console_errors.append(params["exceptionDetails"].get("text", "exception"))
        elif msg.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console_errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                                for a in params.get("args", [])))

    def send(self, method: str, params: dict | None = None, session: bool = True, timeout: float | None = None) -> dict:
        """One DevTools command; its result (raises :class:`BrowserError` on an error or time-out)."""
        with self._lock:
            self._next_id += 1
            mid = self._next_id
            self._replies[mid] = q = queue.Queue()
        msg = {"id": mid, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        try:
            os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
            end = time.monotonic() + (timeout or self.timeout)
            while True:                          # wake up now and then to notice a dead browser
                try:
                    reply = q.get(timeout=0.5)
                    break
                except queue.Empty:
                    if self.proc.poll() is not None:
                        raise OSError("exited") from None
                    if time.monotonic() > end:
                        raise
        except queue.Empty:
            raise BrowserError(f"Chromium did not answer {method} within {timeout or self.timeout:.0f} s"
                               + self._exit_note()) from None
        except OSError as exc:
            raise BrowserError(f"Chromium is gone ({exc})" + self._exit_note()) from None
        finally:
            with self._lock:
                self._replies.pop(mid, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def _exit_note(self) -> str:
        if self.proc.poll() is None:
            return ""
        tail = b"".join(self._stderr).decode(errors="replace").strip().splitlines()[-3:]
        return f"; it exited with {self.proc.returncode}: " + " | ".join(tail)

    def open_page(self) -> None:
        """A new page target, attached as this object's session."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.send(f"{domain}.enable")
        w, h = self.size
        self.send("Emulation.setDeviceMetricsOverride", {"width": w, "height": h, "deviceScaleFactor": 1,
                                                         "mobile": False})

    def evaluate(self, expression: str):
        """A JavaScript expression's value (by value)."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            raise BrowserError(f"page script failed: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def close(self) -> None:
        """Close the browser, then make sure the process and its profile are gone."""
        with contextlib.suppress(Exception):
            self.send("Browser.close", session=False, timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.close(self._cmd_w)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wait_load(browser: Chromium, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            msg = browser.events.get(timeout=max(0.05, end - time.monotonic()))
        except queue.Empty:
            break
        if msg.get("method") == "Page.loadEventFired":
            return
    raise BrowserError(f"the page did not finish loading within {timeout:.0f} s")


def check_report(report: str | Path, screenshot: str | Path | None = None, chromium: str | None = None,
                 width: int = 1280, height: int = 900, full_page: bool = True, max_height: int | None = None,
                 video_timeout: float = 30.0) -> PageCheck:
    """Open ``report`` (an HTML file; its folder is served) in headless Chromium, wait until every
    ``<video>`` has decoded a frame (or failed, or ``video_timeout`` passed), pause the videos and
    save a PNG of the page (the whole page, cut at ``max_height`` pixels, when ``full_page``)."""
    report = Path(report).resolve()
    if not report.is_file():
        raise FileNotFoundError(f"no report at {report}")
    t0 = time.perf_counter()
    with serve(report.parent) as base, Chromium(chromium, width, height) as browser:
        url = base + report.name
        browser.open_page()
        browser.send("Page.navigate", {"url": url})
        _wait_load(browser, browser.timeout)
        end = time.monotonic() + video_timeout
        while True:
            states = [VideoState(v["src"], v["readyState"], v["width"], v["height"],
                                 v["duration"] if isinstance(v["duration"], (int, float)) else None, v["error"])
                      for v in json.loads(browser.evaluate(_VIDEO_STATE_JS))]
            if all(s.loaded or s.error for s in states) or time.monotonic() > end:
                break
            time.sleep(0.2)
        shot = None
        if screenshot is not None:
            # still frames: pause where each video is, so the picture shows decoded frames
            browser.evaluate("Promise.all([...document.querySelectorAll('video')].map(v => { v.pause(); "
                             "return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r))); }))")
            params: dict = {"format": "png"}
            if full_page:
                size = browser.send("Page.getLayoutMetrics")["cssContentSize"]
                h = int(min(size["height"], max_height) if max_height else size["height"])
                params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": width, "height": h,
                                                               "scale": 1})
            shot = Path(screenshot)
            shot.parent.mkdir(parents=True, exist_ok=True)
            shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", params)["data"]))
    return PageCheck(url, states, shot, list(browser.console_errors), time.perf_counter() - t0)
