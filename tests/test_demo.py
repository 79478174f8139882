"""``hsface demo``: the app served on a free local port with random-tiny, driven over HTTP by
gradio_client, plus one real headless-Chromium session (Selenium) that clicks /sample."""

import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the demo needs the [demo] extra")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from builder.demo import launch  # noqa: E402

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "demo-sample.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("exports")
    port = _free_port()
    app = launch("random-tiny", port=port, export_dir=export_dir, block=False)
    yield f"http://127.0.0.1:{port}/", export_dir
    app.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], verbose=False)


def _image(item) -> Image.Image:
    image = item["image"]  # the client hands back a downloaded file path (older clients: a FileData dict)
    return Image.open(image["path"] if isinstance(image, dict) else image)


def _captions(gallery):
    return [item["caption"] for item in gallery]


def test_binds_loopback_only(server):
    assert server[0].startswith("http://127.0.0.1:")


def test_sample_returns_faces_and_heatmap(client):
    gallery, heatmap = client.predict(4, 0.3, 0, api_name="/sample")
    assert _captions(gallery) == [f"identity {i}" for i in range(4)]
    assert _image(gallery[0]).size == (112, 112)
    assert Image.open(heatmap).size[0] > 150


def test_vary_captions_cosine_to_the_identity(client):
    gallery = client.predict(1, 0.3, 3, 0.3, 0, api_name="/vary")
    cosines = [float(c.split()[1]) for c in _captions(gallery)]
    assert len(cosines) == 3 and all(0.0 < c <= 1.0 for c in cosines)
    # the same identity at a larger sigma moves further away
    far = client.predict(1, 1.2, 3, 0.3, 0, api_name="/vary")
    assert np.mean([float(c.split()[1]) for c in _captions(far)]) < np.mean(cosines)


def test_pose_reports_per_image_success_and_reached_yaw(client):
    gallery, table = client.predict(0, 60, None, 27, 1, 2, 0.3, 0, api_name="/pose")
    assert len(gallery) == 2 and len(table) == 2
    for row in table:
        assert row["target_yaw"] == 60 and math.isfinite(row["yaw"]) and row["steps"] == 1 and "pitch" not in row
        assert row["attrop_success"] is False  # random weights after one step: not reached, and said so
    assert all("not reached" in c for c in _captions(gallery))


def test_pose_steers_pitch_too_when_asked(client):
    gallery, table = client.predict(0, 30, -20, 27, 1, 1, 0.3, 0, api_name="/pose")
    assert len(table) == 1 and table[0]["target_pitch"] == -20 and math.isfinite(table[0]["pitch"])
    assert "(target -20)" in _captions(gallery)[0]


def test_impossible_pose_target_is_a_readable_error(client):
    # the slider's bounds answer first (AttrOPConfig says the same for library callers): one readable line
    with pytest.raises(AppError, match=r"^Value 120 is greater than maximum value 90\.$"):
        client.predict(0, 120, None, 27, 1, 1, 0.3, 0, api_name="/pose")


def test_bad_count_is_a_readable_error(client):
    with pytest.raises(AppError, match=r"^Value 0 is less than minimum value 1\.$"):
        client.predict(0, 0.3, 0, api_name="/sample")


def test_reference_aligns_the_photo_and_varies_it(client, tmp_path):
    pytest.importorskip("skimage", reason="the test photo ships with scikit-image")
    from skimage.data import astronaut

    from vec2face_model.align import AlignmentUnavailableError, MTCNN

    try:
        MTCNN.from_installed()
    except AlignmentUnavailableError as err:
        pytest.skip(str(err))
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()).save(photo)
    crop, gallery = client.predict(handle_file(str(photo)), 0.2, 2, 0, api_name="/reference")
    assert Image.open(crop).size == (112, 112) and len(gallery) == 2

    blank = tmp_path / "wall.png"
    Image.new("RGB", (160, 160), (180, 170, 160)).save(blank)
    with pytest.raises(AppError, match="no face found in"):
        client.predict(handle_file(str(blank)), 0.2, 2, 0, api_name="/reference")


def test_export_writes_a_load_dataset_folder(server):
    from datasets import load_dataset

    client = Client(server[0], verbose=False)  # its own session: exports what this session shows
    client.predict(3, 0.3, 1, api_name="/sample")
    client.predict(2, 0.5, 2, 0.3, 1, api_name="/vary")
    message = client.predict(api_name="/export")
    folders = [p for p in Path(server[1]).iterdir() if p.name in message]
    assert len(folders) == 1, message
    ds = load_dataset(str(folders[0]), split="train")
    assert ds.num_rows == 5 and ds["view"] == ["sample"] * 3 + ["vary"] * 2
    assert ds[0]["image"].size == (112, 112)


def test_export_with_nothing_shown_is_a_readable_error(server):
    with pytest.raises(AppError, match="nothing to export yet"):
        Client(server[0], verbose=False).predict(api_name="/export")


def _chromium():
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    return browser, driver


def test_browser_click_sample_shows_the_gallery(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.get(server[0])
        wait = WebDriverWait(driver, 30)
        wait.until(EC.element_to_be_clickable((By.ID, "sample-button"))).click()
        images = wait.until(lambda d: [im for im in d.find_elements(By.CSS_SELECTOR, "#sample-gallery img")
                                       if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)] or False)
        assert len(images) >= 8  # the tab's default: one face per identity
        assert images[0].get_attribute("src").startswith(server[0].rstrip("/"))
        shot = tmp_path / "demo-sample.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 500
        if os.environ.get("HSFACE_UPDATE_SCREENSHOT"):  # refresh the README's picture on purpose only
            SCREENSHOT.parent.mkdir(exist_ok=True)
            Image.open(shot).convert("RGB").quantize(colors=256).save(SCREENSHOT, optimize=True)
    finally:
        driver.quit()


def test_cli_defaults_bind_loopback_without_share():
    from builder.cli import parser

    args = parser().parse_args(["demo", "--model", "random-tiny"])
    assert (args.host, args.share, args.model) == ("127.0.0.1", False, "random-tiny")
