"""The web chat at `/` in a real browser: Debian's chromium, headless, driven by selenium.

It sends a message and checks what a person would see: the draft canvas redrawn at every
denoising step (settled and noisy positions), the committed reply equal to what the API returns
for the same seed, and the stats line; then a screenshot that must show the page (not a blank
or an error page)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the [server] extra is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="the [server-test] extra is not installed")

import mlx_diffusiongemma as dg
from mlx_diffusiongemma.demo.random import ensure_demo
from mlx_diffusiongemma.server import ServerConfig, create_app

from helpers_server import running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("CI"):  # .ci/run installs them: missing there is a failure, not a skip
        raise RuntimeError("chromium and chromedriver are required in CI (apt-get install chromium chromium-driver)")
    pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGBA/RGB bytes) of a non-interlaced 8-bit PNG, by the spec."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0
    bpp = 4 if color == 6 else 3
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i : i + 3]) for r in rows for i in range(0, stride, bpp)]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    model, tok = dg.load(ensure_demo(tmp_path_factory.mktemp("demo") / "demo"))
    with running(create_app(model, tok, ServerConfig(model_id="demo"))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _api_reply(page_url: str, **extra) -> dict:
    """The API's answer (parsed JSON) to the request the page sends in these tests."""
    from urllib.request import Request, urlopen

    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "Tell me about diffusion"}],
                       "max_tokens": 96, "seed": 11, "chat_template_kwargs": {"enable_thinking": False}, **extra})
    with urlopen(Request(page_url + "/v1/chat/completions", body.encode(),
                         {"Content-Type": "application/json"}), timeout=60) as r:
        return json.load(r)


def test_web_chat_shows_blocks_condensing(page_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_url + "/")
    assert browser.title == "DiffusionGemma chat"
    WebDriverWait(browser, 20).until(lambda d: "demo" in d.find_element(By.ID, "model").text)
    # Record every draft the page draws (the canvas is redrawn in place, so watch its changes).
    browser.execute_script("""
        window.frames_seen = [];
        new MutationObserver(() => {
          const c = document.getElementById('canvas');
          window.frames_seen.push({drafts: c.dataset.drafts, settled: c.querySelectorAll('span.settled').length,
                                   noisy: c.querySelectorAll('span.noisy').length,
                                   status: document.getElementById('canvas-status').textContent});
        }).observe(document.getElementById('canvas'), {childList: true});
    """)
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("96")
    browser.find_element(By.ID, "seed").send_keys("11")
    browser.find_element(By.ID, "prompt").send_keys("Tell me about diffusion")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 120).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"))
    reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
    assert reply.get_attribute("data-done") == "1", reply.text

    frames = browser.execute_script("return window.frames_seen")
    # Redraws are observed in batches (several steps can arrive in one network read), so count
    # the drafts the page drew against the steps the engine ran for the same request, below.
    assert len(frames) >= 2, frames
    assert any(f["noisy"] for f in frames) and any(f["settled"] for f in frames)
    drawn = int(browser.find_element(By.ID, "canvas").get_attribute("data-drafts"))
    assert frames[0]["status"].startswith("block 1 · step 1/")

    # The committed text is exactly what the API gives for the same request.
    answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .answer").get_attribute("textContent")
    expected = _api_reply(page_url)
    assert answer == (expected["choices"][0]["message"]["content"] or "")
    assert drawn == sum(expected["timings"]["steps_per_block"]) > len(expected["timings"]["steps_per_block"])
    stats = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text
    assert "tokens" in stats and "tok/s" in stats and "steps/block" in stats and "tokens/forward" in stats

    shot = tmp_path / "web-chat.png"
    assert browser.save_screenshot(str(shot))
    width, height, pixels = png_pixels(shot)
    assert (width, height) == tuple(browser.execute_script("return [window.innerWidth, window.innerHeight]"))
    # The page's dark theme fills the background and text is drawn on it: many colours, and the
    # background colour (#101418) the most common one.
    counts: dict[bytes, int] = {}
    for p in pixels:
        counts[p] = counts.get(p, 0) + 1
    assert len(counts) > 50
    assert max(counts, key=counts.get) == bytes.fromhex("101418")
    if os.environ.get("DGEMMA_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["DGEMMA_SCREENSHOT_DIR"]) / shot.name)


def test_web_chat_exact_path_checkbox(page_url, browser):
    """The "exact path" box sends `mode: "exact"`: the reply is the API's exact reply for the same
    request (the default, unchecked, is the server's fast mode), and the stats line names the mode."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_url + "/")
    WebDriverWait(browser, 20).until(lambda d: "demo" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("96")
    browser.find_element(By.ID, "seed").send_keys("11")
    browser.find_element(By.ID, "exact").click()
    browser.find_element(By.ID, "prompt").send_keys("Tell me about diffusion")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"))
    answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .answer").get_attribute("textContent")
    reply = lambda mode: _api_reply(page_url, mode=mode)["choices"][0]["message"]["content"] or ""  # noqa: E731
    assert answer == reply("exact") != reply("fast")
    assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text.endswith("· exact")
