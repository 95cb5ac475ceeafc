"""The DLQ admin page in a real headless Chromium, driven through the system chromedriver.

The W3C WebDriver protocol is plain JSON over HTTP, so a few lines of urllib drive it: no
Selenium, no driver or browser download.  Skipped when /usr/bin/chromium (Debian package
``chromium``) or /usr/bin/chromedriver (``chromium-driver``) is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from celery_dlq.http import DLQAdmin, mount_wsgi
from celery_dlq.store import NotFound

from .test_dlq_http import XSS, Server, env  # noqa: F401  (env is a fixture)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--window-size=1400,900"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Chromium and chromedriver: apt-get install chromium chromium-driver")


def until(check, what, timeout=15.0):
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        threading.Event().wait(0.05)  # the poll interval, as WebDriverWait's


class Browser:
    """A WebDriver session on the system chromedriver."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.profile = tempfile.mkdtemp(prefix="dlq-chromium-")
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        until(self._ready, "chromedriver to start")
        caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": CHROMIUM, "args": FLAGS + [f"--user-data-dir={self.profile}"]}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _ready(self):
        try:
            return self._call("GET", "/status").get("ready")
        except OSError:
            return False

    def _call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as err:
            raise AssertionError(f"WebDriver {method} {path}: {err.read()[:500]!r}") from None

    def cmd(self, method, path, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url):
        self.cmd("POST", "/url", {"url": url})

    def js(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css):
        found = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        assert isinstance(found, dict) and ELEMENT in found, (css, found)
        return found[ELEMENT]

    def click(self, css):
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css, text):
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": text})

    def console(self):
        return self.cmd("POST", "/se/log", {"type": "browser"})

    def close(self):
        try:
            self.cmd("DELETE", "")
        finally:
            self.driver.terminate()
            self.driver.wait(10)
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


ROWS = "return Array.from(document.querySelectorAll('#entries tbody tr')).map(tr => tr.dataset.id)"


def rows(browser):
    return [int(i) for i in browser.js(ROWS)]


def cell(browser, row_id, cls):
    return browser.js(f"var c = document.querySelector('tr[data-id=\"{row_id}\"] td.{cls}');"
                      "return c ? c.textContent : null")


def test_the_page_lists_requeues_deletes_and_never_runs_stored_text(env, browser):  # noqa: F811
    a = env.add(task="proj.a")
    xss = env.add(task="proj.evil", exc="myapp.Boom", message=XSS)
    c = env.add(task="proj.c", queue="other")

    def host(environ, start_response):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not here"]

    server = Server(mount_wsgi("/admin/dlq", DLQAdmin(env.app), host))
    try:
        browser.get(server.base + "/admin/dlq/")
        assert until(lambda: rows(browser) == [c, xss, a], "the three rows")
        assert browser.js("return document.getElementById('total').textContent") == "3 entries match"
        assert cell(browser, a, "task") == "proj.a" and cell(browser, c, "queue") == "other"
        assert cell(browser, a, "reason") == "non_retryable" and cell(browser, a, "failures") == "1"
        assert cell(browser, a, "when").startswith("20")
        # The payload is shown as text, and nothing of it ran or became markup.
        assert cell(browser, xss, "exc") == "myapp.Boom: " + XSS
        assert browser.js("return typeof window.__dlq_xss") == "undefined"
        assert browser.js("return document.querySelectorAll('#entries img, #entries tbody script').length") == 0

        # Requeue: the row's status updates, and the message is back on its queue.
        browser.click(f'tr[data-id="{a}"] button.requeue')
        assert until(lambda: cell(browser, a, "status") == "requeued", "the row to say requeued")
        assert env.store.get(a)["status"] == "requeued" and env.queued("celery") == 1
        assert "requeued to celery" in browser.js("return document.getElementById('message').textContent")

        # Delete asks for a second click, then the row goes.
        browser.click(f'tr[data-id="{c}"] button.delete')
        assert until(lambda: cell(browser, c, "actions") and "Confirm delete" in cell(browser, c, "actions"),
                     "the delete confirmation")
        assert c in rows(browser)
        browser.click(f'tr[data-id="{c}"] button.delete')
        assert until(lambda: rows(browser) == [xss, a], "the deleted row to go")
        with pytest.raises(NotFound):
            env.store.get(c)

        # The filter box.
        browser.type('#filters input[name="task"]', "proj.evil")
        browser.click("#apply")
        assert until(lambda: rows(browser) == [xss], "the filtered list")
        assert browser.js("return document.getElementById('total').textContent") == "1 entry matches"
        browser.js("document.querySelector('#filters select[name=\"status\"]').value = 'requeued'")
        browser.click("#apply")  # task=proj.evil and status=requeued: nothing
        assert until(lambda: rows(browser) == [] and "0 entries" in browser.js(
            "return document.getElementById('total').textContent"), "the empty list")
        browser.click("#clear")
        assert until(lambda: rows(browser) == [xss, a], "the unfiltered list")

        assert browser.js("return typeof window.__dlq_xss") == "undefined"
        errors = [e["message"] for e in browser.console() if e["level"] == "SEVERE"]
        assert errors == [], errors  # no script error, no blocked inline script or handler
    finally:
        server.close()


def test_with_a_token_the_page_asks_for_it(env, browser):  # noqa: F811
    row_id = env.add(task="proj.secret")
    server = Server(DLQAdmin(env.app, token="s3cret"))
    try:
        browser.get(server.base + "/")
        assert until(lambda: browser.js("return !document.getElementById('login').hidden"), "the sign-in form")
        assert rows(browser) == []
        browser.type("#token", "s3cret")
        browser.click('#login button[type="submit"]')
        assert until(lambda: rows(browser) == [row_id], "the rows after signing in")
        browser.click(f'tr[data-id="{row_id}"] button.requeue')
        assert until(lambda: cell(browser, row_id, "status") == "requeued", "the requeued row")
        assert env.queued("celery") == 1
    finally:
        browser.js("sessionStorage.clear()")
        server.close()


def test_load_more_follows_the_cursor(env, browser):  # noqa: F811
    ids = [env.add(task="proj.many") for _ in range(53)]
    server = Server(DLQAdmin(env.app))
    try:
        browser.get(server.base + "/")
        assert until(lambda: len(rows(browser)) == 50, "the first page of 50")
        assert rows(browser) == ids[::-1][:50]
        assert browser.js("return document.getElementById('more').hidden") is False
        browser.click("#more")
        assert until(lambda: rows(browser) == ids[::-1], "all 53 rows")
        assert browser.js("return document.getElementById('more').hidden") is True
    finally:
        server.close()
