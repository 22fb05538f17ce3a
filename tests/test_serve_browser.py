"""The page of `vitlab serve` in a real headless Chromium: upload a photo, see the top-5 bars and the overlay.

Needs Debian's `chromium` and `chromium-driver` (`make test` installs them where it runs as root with apt) and
Selenium. `VITLAB_SCREENSHOT=docs/serve-screenshot.png` saves the page after the upload.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from helpers import random_model
from vitlab.models.vit import ViTConfig

webdriver = pytest.importorskip("selenium.webdriver", reason="Selenium is not installed (pip install selenium)")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (the chelsea photo) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_serve import save_with_classes  # noqa: E402

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs chromium and chromedriver on PATH "
                                       "(Debian: apt-get install chromium chromium-driver)")
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PAGE_VIT = ViTConfig(img_size=(64, 64), patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, num_classes=10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`python -m vitlab serve` on a free local port with an untrained 64-px ViT; yields its URL and log file."""
    checkpoint = save_with_classes(random_model(PAGE_VIT), tmp_path / "untrained-vit.safetensors", CIFAR10)
    port, log = free_port(), tmp_path / "server.log"
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                  os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "vitlab", "serve", str(checkpoint), "--port", str(port)],
                                   stdout=output, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield url, log
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_page_classifies_an_uploaded_photo(server: tuple[str, Path], tmp_path: Path) -> None:
    url, log = server
    photo = tmp_path / "chelsea.jpg"
    Image.fromarray(skimage_data.chelsea()).save(photo, quality=92)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,760"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda page: "classes" in page.find_element(By.ID, "model-name").text)
        driver.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda page: len(page.find_elements(By.CSS_SELECTOR, "#top5 li")) == 5)
        wait.until(lambda page: page.execute_script(
            "const image = document.getElementById('overlay');"
            "return image.complete && image.naturalWidth > 0 && image.src.startsWith('data:image/png');"))
        rows = [row.text.split("\n") for row in driver.find_elements(By.CSS_SELECTOR, "#top5 li")]
        assert all(label in CIFAR10 and percent.endswith("%") for label, percent in rows), rows
        percents = [float(percent.rstrip("%")) for _, percent in rows]
        assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.5
        assert "JPEG 451 × 300" in driver.find_element(By.ID, "status").text
        final = driver.find_element(By.ID, "overlay").get_attribute("src")
        # The layer slider redraws the overlay in the page from the per-layer grids, then goes back to the server's.
        slide = ("const slider = document.getElementById('layer'); slider.value = arguments[0];"
                 "slider.dispatchEvent(new Event('input'));")
        driver.execute_script(slide, 1)
        first = driver.find_element(By.ID, "overlay").get_attribute("src")
        assert first.startswith("data:image/png") and first != final
        assert driver.find_element(By.ID, "layer-value").text == f"1 of {PAGE_VIT.depth}"
        driver.execute_script(slide, PAGE_VIT.depth)
        assert driver.find_element(By.ID, "overlay").get_attribute("src") == final
        if os.environ.get("VITLAB_SCREENSHOT"):
            driver.save_screenshot(os.environ["VITLAB_SCREENSHOT"])
    finally:
        driver.quit()
    assert "POST /v1/predict?top_k=5&attention=rollout&layers=true 200" in log.read_text()
