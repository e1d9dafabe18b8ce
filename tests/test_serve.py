"""Serving on Ray Serve, started the real way: a local Ray, Serve on 127.0.0.1, a tiny model registered
in a private SQLite MLflow as ``models:/selfe@champion``. One server for the module; the tests that move
the alias or kill the replica run last."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfe.generator import load_generator
from tests.ports import free_port
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = REPO / "outputs" / "test-artefacts"


def call(url: str, body: dict | bytes | None = None, timeout: float = 60.0) -> tuple[int, dict, bytes]:
    """(status, headers, body bytes) of a GET (body None) or a JSON POST; HTTP errors are returned, not raised."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def register(root: Path, version_seed: int, uri: str, broken: bool = False) -> tuple[int, Path]:
    """Register a tiny model (weights drawn from ``version_seed``) as the next version of "selfe" and point
    @champion at it; ``broken``: its weights file is not safetensors. Returns (version, model folder)."""
    import mlflow

    from selfe.tracking.registry import log_and_register
    from selfe.tracking.runs import get_or_create_experiment

    model_dir = save_tiny_model(root / f"model-{version_seed}", seed=version_seed)
    if broken:
        (model_dir / "weights.safetensors").write_bytes(b"not a safetensors file")
    mlflow.set_tracking_uri(uri)
    run = mlflow.MlflowClient().create_run(get_or_create_experiment("serve-test"))
    version = log_and_register(run.info.run_id, model_dir, "selfe", "candidate", promote_champion=True)
    return version, model_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, tracking URI, root, first model folder) of ``pipelines/serve.py`` running as a user starts
    it; Ctrl-C (SIGINT) at the end must stop it cleanly, Ray included."""
    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        version, model_dir = register(root, 0, uri)
    assert version == 1
    port = free_port()
    settings = ["poll_s=0.5", "max_batch_size=8", "batch_wait_s=0.2", "max_ongoing_requests=8",
                "max_queued_requests=4", "max_images=8"]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pipelines" / "serve.py"), "--model", "models:/selfe@champion", "--port", str(port),
         "--tracking-uri", uri, "--device", "cpu", *[a for kv in settings for a in ("--set", kv)]],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 300
    while not any(line.startswith("serving ") for line in lines):
        assert proc.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "the server did not start in 300 s:\n" + "".join(lines)
        time.sleep(0.5)
    try:
        yield f"http://127.0.0.1:{port}", uri, root, model_dir
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
        time.sleep(0.5)  # the reader thread takes the last lines
        text = "".join(lines)
        assert code == 0 and "stopping" in text, text
        assert f"at http://127.0.0.1:{port}/" in text and "Traceback" not in text, text


def test_a_reference_that_is_not_in_the_registry_fails_before_ray_starts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register(tmp_path, 0, uri)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(REPO / "pipelines" / "serve.py"), "--model", "models:/selfe@nope",
                          "--tracking-uri", uri], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("serve.py: error: cannot find model models:/selfe@nope")
    assert len(out.stderr.strip().splitlines()) == 1 and time.monotonic() - t0 < 60
    bad = subprocess.run([sys.executable, str(REPO / "pipelines" / "serve.py"), "--set", "max_batch=4"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown serve setting(s) ['max_batch']" in bad.stderr


def expected(model_dir: Path, prompt: str, n: int, steps: int, seed: int) -> np.ndarray:
    images, _ = load_generator(model_dir).generate([prompt] * n, steps=steps, seed=seed)
    return images


def test_png_and_json_answers_draw_what_generate_draws(server):
    url, _, _, model_dir = server
    status, headers, body = call(f"{url}/v1/images", {"prompt": "a photo of a red circle", "steps": 2, "seed": 5})
    assert status == 200 and headers["content-type"] == "image/png"
    assert headers["x-model-version"] == "1" and headers["x-steps"] == "2" and float(headers["x-seconds"]) > 0
    np.testing.assert_array_equal(png(body), expected(model_dir, "a photo of a red circle", 1, 2, 5)[0])

    status, headers, body = call(f"{url}/v1/images", {"prompt": "two blue squares", "steps": 4, "seed": 3,
                                                      "num_images": 3, "format": "json"})
    data = json.loads(body)
    assert status == 200 and data["steps"] == 4 and data["model"]["version"] == 1 and data["nfe"] > 0
    got = np.stack([png(base64.b64decode(b)) for b in data["images"]])
    np.testing.assert_array_equal(got, expected(model_dir, "two blue squares", 3, 4, 3))


def test_concurrent_requests_share_a_forward_and_keep_their_own_images(server):
    url, _, _, model_dir = server
    asks = [{"prompt": p, "steps": 2, "seed": s, "format": "json"}
            for s, p in enumerate(["a red circle", "a green square", "a blue triangle", "a red circle",
                                   "two yellow circles", "a green square"])]
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda a: call(f"{url}/v1/images", a), asks))
    assert all(status == 200 for status, _, _ in answers)
    datas = [json.loads(body) for _, _, body in answers]
    assert max(d["batch_images"] for d in datas) > 1, "no two requests shared a forward"
    for ask, data in zip(asks, datas):
        np.testing.assert_array_equal(png(base64.b64decode(data["images"][0])),
                                      expected(model_dir, ask["prompt"], 1, 2, ask["seed"])[0])
    status, _, body = call(f"{url}/v1/model")
    assert json.loads(body)["text_cache"]["hits"] >= 2  # repeated prompts were not encoded again


def test_model_health_readiness_and_api_page(server):
    url = server[0]
    status, _, body = call(f"{url}/v1/model")
    info = json.loads(body)
    assert status == 200 and (info["name"], info["version"], info["alias"]) == ("selfe", 1, "champion")
    assert info["method"] == "self_e" and info["resolution"] == 32 and info["run_id"]
    assert info["sampler"]["steps"] == 2 and info["sampler"]["eta"] is not None and info["sampler"]["eta_per_step"]
    assert call(f"{url}/healthz")[0] == 200
    status, _, body = call(f"{url}/readyz")
    assert status == 200 and json.loads(body) == {"ready": True, "version": 1}
    status, _, body = call(f"{url}/openapi.json")
    schema = json.loads(body)["components"]["schemas"]["ImageRequest"]
    assert schema["properties"]["num_images"]["maximum"] == 8 and schema["additionalProperties"] is False
    assert call(f"{url}/docs")[0] == 200


@pytest.mark.parametrize("body,field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 1001}, "prompt"),
    ({"prompt": "a red circle", "steps": 0}, "steps"),
    ({"prompt": "a red circle", "steps": 101}, "steps"),
    (b'{"prompt": "a red circle", "guidance": NaN}', "guidance"),
    ({"prompt": "a red circle", "guidance": 1e9}, "guidance"),
    ({"prompt": "a red circle", "num_images": 9}, "num_images"),
    ({"prompt": "a red circle", "seed": -1}, "seed"),
    ({"prompt": "a red circle", "format": "gif"}, "format"),
    ({"prompt": "a red circle", "stpes": 2}, "stpes"),
    ({"steps": 2}, "prompt"),
])
def test_bad_requests_are_refused_naming_the_field(server, body, field):
    status, _, answer = call(f"{server[0]}/v1/images", body)
    detail = json.loads(answer)["detail"]
    assert status == 422 and any(field in d["loc"] for d in detail), detail
    assert call(f"{server[0]}/healthz")[0] == 200


def test_a_body_that_is_not_json_is_refused(server):
    status, _, answer = call(f"{server[0]}/v1/images", b"prompt=a red circle")
    assert status == 422 and "json" in answer.decode().lower()


def test_overload_is_answered_503_with_retry_after_never_a_hang(server):
    """8 ongoing + 4 queued are held; 40 clients at once at 8 steps x 8 images: the rest get 503 at once."""
    url = server[0]
    ask = {"prompt": "a red circle", "steps": 8, "num_images": 8, "format": "json"}
    t0 = time.monotonic()
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda _: call(f"{url}/v1/images", ask, timeout=120), range(40)))
    statuses = [s for s, _, _ in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 8 and statuses.count(503) >= 1, statuses
    assert all(h.get("retry-after") == "1" for s, h, _ in answers if s == 503)
    assert time.monotonic() - t0 < 120


def test_the_web_page_generates_an_image_in_a_real_browser(server):
    """Chromium (Debian's, headless) types a prompt, presses Generate and sees an image; the screenshot is
    kept in outputs/test-artefacts/serve_page.png."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(server[0] + "/")
        WebDriverWait(driver, 30).until(ec.text_to_be_present_in_element((By.ID, "model"), "version 1"))
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys("a photo of a blue square")
        Select(driver.find_element(By.ID, "steps")).select_by_visible_text("4")
        driver.find_element(By.ID, "generate").click()
        image = WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#images img")))
        WebDriverWait(driver, 10).until(lambda d: image.get_property("naturalWidth") == 32)
        status = driver.find_element(By.ID, "status").text
        assert "model version 1" in status and "4 steps" in status, status
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTEFACTS / "serve_page.png"))
        assert (ARTEFACTS / "serve_page.png").stat().st_size > 1000
    finally:
        driver.quit()


def test_moving_the_alias_swaps_versions_without_a_failed_request_and_a_broken_one_is_kept_out(server):
    url, uri, root, _ = server
    failures, done, count = [], threading.Event(), [0]

    def keep_asking() -> None:
        while not done.is_set():
            status, _, body = call(f"{url}/v1/images", {"prompt": "a red circle", "steps": 2})
            count[0] += 1
            if status != 200:
                failures.append((status, body[:200]))

    traffic = threading.Thread(target=keep_asking)
    traffic.start()
    try:
        version, model_dir = register(root, 1, uri)
        assert version == 2
        deadline = time.monotonic() + 60
        while json.loads(call(f"{url}/v1/model")[2])["version"] != 2:
            assert time.monotonic() < deadline, "the server never moved to version 2"
            time.sleep(0.5)
    finally:
        done.set()
        traffic.join()
    assert not failures and count[0] > 0
    status, headers, body = call(f"{url}/v1/images", {"prompt": "a red circle", "steps": 2, "seed": 9})
    assert headers["x-model-version"] == "2"
    np.testing.assert_array_equal(png(body), expected(model_dir, "a red circle", 1, 2, 9)[0])

    broken, _ = register(root, 2, uri, broken=True)
    deadline = time.monotonic() + 60
    while not (json.loads(call(f"{url}/v1/model")[2]).get("last_error") or {}).get("version") == broken:
        assert time.monotonic() < deadline, "the broken version was never tried"
        time.sleep(0.5)
    info = json.loads(call(f"{url}/v1/model")[2])
    assert info["version"] == 2 and "weights" in info["last_error"]["error"]
    assert call(f"{url}/v1/images", {"prompt": "a red circle"})[0] == 200


def test_a_replica_that_dies_is_restarted_and_requests_in_flight_fail_cleanly(server):
    """The replica's process is killed (SIGKILL, as the OOM killer would) while it holds requests."""
    url = server[0]
    replicas = [int(proc.name) for proc in Path("/proc").iterdir() if proc.name.isdigit()
                and "ServeReplica:selfe:ImageServer" in _cmdline(proc)]  # Ray titles its actor processes
    assert len(replicas) == 1, replicas
    with ThreadPoolExecutor(4) as pool:
        flying = [pool.submit(call, f"{url}/v1/images", {"prompt": "a red circle", "steps": 50, "num_images": 8},
                              120) for _ in range(4)]
        time.sleep(0.3)
        os.kill(replicas[0], signal.SIGKILL)
        statuses = [f.result()[0] for f in flying]  # answered (an error or an image), none hangs
    assert all(s in (200, 500, 502, 503) for s in statuses) and statuses != [200] * 4, statuses
    # A request sent while Serve starts a new replica waits for it (the proxy holds it), then succeeds.
    deadline = time.monotonic() + 180
    while call(f"{url}/v1/images", {"prompt": "a red circle"}, timeout=170)[0] != 200:
        assert time.monotonic() < deadline, "the replica never came back"
        time.sleep(1)
    # The alias still points at the broken version 3 (the test before): the new replica serves the version
    # the application was deployed with, and says why.
    info = json.loads(call(f"{url}/v1/model")[2])
    assert info["version"] == 1 and info["last_error"]["version"] == 3, info


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # the process ended meanwhile
        return ""
