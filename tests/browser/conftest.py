"""Fixtures of the console's browser tests: the real gateway on a loopback port and a real
headless Chromium driving /console.

- `console`: the gateway (`Services.build` + `create_app`, as `loraplex up` builds it) served by
  uvicorn in a thread on a free loopback port, with the stand-in engine of the unit tests
  on a loopback port of its own (`ScriptedEngine`: the adapter and the base model answer differently, and a
  stream can be held after its first piece to see it arrive in pieces). `console.run(coro)`
  runs a coroutine on the server's loop (to make job records as the worker does).
- `browser`: Debian's chromium through chromium-driver (installed by scripts/install.sh --dev),
  headless, with its console and network logs, one for the session. `Page` wraps a test's
  use of it: waits, login, screenshots, and the checks every page must pass (no script error,
  no CSP violation, no credential in any URL the browser requested).
- Screenshots go to $LORAPLEX_TEST_ARTIFACTS/console (default tests/browser/artifacts), printed
  in pytest's header.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from server.app import create_app
from server.services import Services
from server.settings import Settings
from tests.unit.conftest import (  # noqa: F401  (base_model_dir is a fixture used here)
    BASE_MODEL,
    FakeEngine,
    _compact,
    base_model_dir,
)

T = TypeVar("T")
ADMIN_TOKEN = "console-admin-token-7d1f"
ARTIFACTS = Path(os.environ.get("LORAPLEX_TEST_ARTIFACTS")
                 or Path(__file__).parent / "artifacts") / "console"
# A hang guard for each wait in the browser, not a performance threshold.
WAIT_S = 15
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
ADAPTER_PIECES = ("Arr, ", HOSTILE, " the answer be Paris, matey.")
BASE_PIECES = ("The capital ", "of France ", "is Paris.")


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise RuntimeError("the browser tests need Debian's chromium and chromium-driver: "
                           "run scripts/install.sh --dev (as root), or apt-get install them")
    return browser, driver


def pytest_report_header() -> str:
    return f"console screenshots: {ARTIFACTS}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    shots = sorted(ARTIFACTS.glob("*.png")) if ARTIFACTS.is_dir() else []
    if shots:
        terminalreporter.write_line(f"console screenshots ({len(shots)}): {ARTIFACTS}")


class ScriptedEngine(FakeEngine):
    """The unit tests' stand-in engine, with a different streamed answer for the adapter
    (hostile markup inside) and the base model; `release` cleared holds every stream after
    its first piece until it is set again."""

    def __init__(self) -> None:
        super().__init__(BASE_MODEL)
        self.release = threading.Event()
        self.release.set()

    async def _events(self, model: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        pieces = BASE_PIECES if model == self.base_model else ADAPTER_PIECES
        for i, piece in enumerate(pieces):
            delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            yield "data: " + _compact({"id": "fake", "object": "chat.completion.chunk",
                                       "created": 0, "model": model,
                                       "choices": [delta]}) + "\n\n"
            while i == 0 and not self.release.is_set():
                await asyncio.sleep(0.01)
        if include_usage:
            yield "data: " + _compact({
                "id": "fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces),
                                         "total_tokens": 5 + len(pieces)}}) + "\n\n"
        yield "data: [DONE]\n\n"


class ConsoleServer:
    """The gateway on a free loopback port, its event loop in a thread of its own."""

    def __init__(self, settings: Settings, model_dir: Path, engine: ScriptedEngine) -> None:
        self.settings, self.model_dir, self.engine = settings, model_dir, engine
        self.loop = asyncio.new_event_loop()
        self.services: Services | None = None
        self._server: uvicorn.Server | None = None
        self._engine_server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None
        self.url = ""

    def start(self) -> ConsoleServer:
        sock, engine_sock = _loopback_socket(), _loopback_socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.settings = self.settings.model_copy(update={
            "engine_url": f"http://127.0.0.1:{engine_sock.getsockname()[1]}"})
        self._thread = threading.Thread(target=self._run, args=(sock, engine_sock), daemon=True)
        self._thread.start()
        self.admin = httpx.Client(base_url=self.url, timeout=WAIT_S,
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        wait_for(self._healthy, "the gateway to be ready")
        return self

    def _run(self, sock: socket.socket, engine_sock: socket.socket) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve(sock, engine_sock))
        except BaseException as exc:  # noqa: BLE001  (reported by start's wait)
            self._failed = exc

    async def _serve(self, sock: socket.socket, engine_sock: socket.socket) -> None:
        # The stand-in engine is a real HTTP server too: an in-process transport would
        # buffer each answer whole, and the playground must see a stream arrive in pieces.
        self._engine_server = uvicorn.Server(uvicorn.Config(
            self.engine.app, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=1))
        self.services = Services.build(self.settings, model_path=self.model_dir)
        # The stand-in base model has no tokenizer: dataset checks run without length checks
        # (as in the unit tests), and transformers is never imported into the server's loop.
        self.services.fine_tuning.tokenizer = _no_tokenizer  # type: ignore[method-assign]
        config = uvicorn.Config(create_app(self.services), log_level="warning",
                                access_log=False, lifespan="on", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        engine = asyncio.create_task(self._engine_server.serve(sockets=[engine_sock]))
        try:
            await self._server.serve(sockets=[sock])
        finally:
            self._engine_server.should_exit = True
            await engine

    def _healthy(self) -> bool:
        if self._failed is not None:
            raise AssertionError(f"the gateway did not start: {self._failed!r}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the server's loop (its registry connections live there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def stop(self) -> None:
        self.engine.release.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.admin.close()


async def _no_tokenizer() -> None:
    return None


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    import time

    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def console(tmp_path_factory: pytest.TempPathFactory,
            base_model_dir: Path) -> Iterator[ConsoleServer]:  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):  # a developer's LORAPLEX_* must not leak in
            if name.upper().startswith("LORAPLEX_") and name != "LORAPLEX_TEST_ARTIFACTS":
                mp.delenv(name)
        home = tmp_path_factory.mktemp("console-home")
        settings = Settings(home=home, admin_token=ADMIN_TOKEN, engine_url="http://unset",
                            max_resident_adapters=4, max_loras=2, max_lora_rank=16,
                            usage_flush_s=0.2, engine_health_poll_s=3600.0)
        server = ConsoleServer(settings, base_model_dir, ScriptedEngine()).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[WebDriver]:
    binary, driver_path = _chromium()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # this run's screenshots only
        old.unlink()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1100", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """One test's view of the browser, on the console of `server`."""

    def __init__(self, driver: WebDriver, server: ConsoleServer) -> None:
        self.driver, self.server = driver, server
        self.secrets = [ADMIN_TOKEN]  # must never appear in a requested URL
        self.requested: list[str] = []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    # -- navigation and waits ---------------------------------------------------------------

    def open(self, route: str = "") -> None:
        self.driver.get(f"{self.server.url}/console{'#/' + route if route else ''}")

    def go(self, route: str) -> None:
        self.driver.execute_script("location.hash = arguments[0]", f"#/{route}")

    def wait(self, predicate: Callable[[WebDriver], Any], what: str) -> Any:
        def check(driver: WebDriver) -> Any:
            try:
                return predicate(driver)
            except StaleElementReferenceException:  # the page redrew under us: look again
                return False
        return WebDriverWait(self.driver, WAIT_S, poll_frequency=0.05).until(check, what)

    def find(self, css: str) -> WebElement:
        return self.wait(lambda d: d.find_element(By.CSS_SELECTOR, css)
                         if d.find_elements(By.CSS_SELECTOR, css) else None, css)

    def all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text_of(self, css: str) -> str:
        return self.find(css).text

    def wait_text(self, css: str, contains: str) -> WebElement:
        return self.wait(lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, css)
                                         if contains in e.text), None),
                         f"{css} to contain {contains!r}")

    def type(self, css: str, text: str) -> None:
        el = self.find(css)
        el.clear()
        el.send_keys(text)

    def select(self, css: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        self.wait(lambda d: any(o.get_attribute("value") == value
                                for o in d.find_elements(By.CSS_SELECTOR, f"{css} option")),
                  f"option {value!r} in {css}")
        Select(self.find(css)).select_by_value(value)

    def click_button(self, text: str, within: str = "body") -> None:
        self.wait_text(f"{within} button", text).click()

    # -- sessions ---------------------------------------------------------------------------

    def login_admin(self, route: str = "") -> None:
        self.logout()
        self.open(route)
        self.type("#login-token", ADMIN_TOKEN)
        self.find("#login-submit").click()
        self.find("#nav a.active")

    def login_tenant(self, tenant: str, key: str) -> None:
        self.logout()
        self.secrets.append(key)
        self.open()
        self.find('.tabs button[data-role="tenant"]').click()
        assert self.find("#login-tenant").is_displayed()
        self.type("#login-tenant", tenant)
        self.type("#login-token", key)
        self.find("#login-submit").click()
        self.find("#nav a.active")

    def logout(self) -> None:
        self.open()
        self.driver.execute_script("sessionStorage.clear()")

    # -- evidence ---------------------------------------------------------------------------

    def screenshot(self, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def check_health(self) -> None:
        """No script error and no CSP violation in the browser's console; no secret in any
        URL the browser requested (or sent as a Referer); no hostile markup ever ran."""
        # An API error answer is logged as "Failed to load resource" (the tests make some on
        # purpose); anything else severe is a script error or a refused policy.
        problems = [e["message"] for e in self.driver.get_log("browser")
                    if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
        assert not problems, problems
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                request = message["params"]["request"]
                self.requested.append(request["url"])
                referer = request.get("headers", {}).get("Referer", "")
                for secret in self.secrets:
                    assert secret not in request["url"] and secret not in referer, request["url"]
        assert self.driver.execute_script("return window.__pwned === undefined")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def page(request: pytest.FixtureRequest, browser: WebDriver,
         console: ConsoleServer) -> Iterator[Page]:
    browser.get_log("browser")  # drop what an earlier test left
    view = Page(browser, console)
    yield view
    failed = getattr(request.node, "report_call", None)
    if failed is not None and failed.failed:  # what the browser showed, and said
        view.screenshot(f"FAILED-{request.node.name}")
        print("browser console:", browser.get_log("browser"))
        return
    view.check_health()
