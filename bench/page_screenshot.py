"""The classifier page in a real browser: serve the committed CIFAR-100-LT model, upload a real test image, screenshot.

    MBIB_DATA_ROOT=DIR python bench/page_screenshot.py    # DIR holds cifar100.zip -> bench/results/classifier_page.png

Run by hand (CI has no browser): needs Debian's `chromium` and the `websockets` package (Ray Serve's uvicorn
brings it). Chromium is driven over the DevTools protocol: open GET /, set the file input to the test image (the
JPEG as stored in cifar100.zip, drawn 7x larger), wait until the page has drawn the bars, check they show what
POST /classify answers, write the image's true class (its folder in the zip) after the file name, and save a
screenshot. The image is the --index-th of the test split in the zip's order, not picked for a right answer.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

from mbib.data.datasets import resolve_data_root
from mbib.export import export_onnx
from mbib.raylocal import free_port

CHECKPOINT = Path(__file__).parent / "results/h200/cells/reproduction-cifar100-lt-200ep/grid-mbib-IF100-seed0.pt"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=900,560"]


def cifar_test_image(zip_path: Path, index: int, out_dir: Path) -> tuple[Path, str]:
    """The index-th test image of cifar100.zip (cifar100/test/CLASS/NAME.jpg), written as is; and its class."""
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("cifar100/test/") and n.endswith(".jpg"))
        if not 0 <= index < len(names):
            raise SystemExit(f"error: --index {index} is out of range: {zip_path} has {len(names)} test images")
        target = out_dir / Path(names[index]).name
        target.write_bytes(archive.read(names[index]))
    return target, names[index].split("/")[2]


def wait_for(what: str, check, timeout: float = 120.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}")


class DevTools:
    """A minimal DevTools-protocol client for one page target (request/response by id; events ignored)."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def page_target(port: int) -> str:
    def find():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
        except OSError:
            return None
        return pages[0]["webSocketDebuggerUrl"] if pages else None

    return wait_for("Chromium's DevTools endpoint", find, timeout=60)


def screenshot(page_url: str, image: Path, true_class: str, out: Path, chromium: str) -> list[dict]:
    """Start Chromium and run `drive` on a fresh profile."""
    from websockets.sync.client import connect

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mbib-chromium-") as profile:
        proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 f"--remote-debugging-port={port}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with connect(page_target(port), max_size=64 * 1024 * 1024) as ws:
                return drive(DevTools(ws), page_url, image, true_class, out)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def drive(tab: DevTools, page_url: str, image: Path, true_class: str, out: Path) -> list[dict]:
    """Upload `image` on the page, wait for the bars, note the true class, save a PNG; returns the rows drawn."""
    tab.call("Page.enable")
    tab.call("Page.navigate", url=page_url)
    wait_for("the page and model metadata", lambda: tab.js(
        "document.readyState === 'complete' && document.getElementById('model').textContent.startsWith('model ')"))
    tab.js("document.getElementById('preview').style.width = '224px'")  # a 32 px image, drawn 7x (pixelated)
    root = tab.call("DOM.getDocument")["root"]["nodeId"]
    node = tab.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    tab.call("DOM.setFileInputFiles", nodeId=node, files=[str(image.resolve())])  # fires the input's change
    wait_for("the probability bars", lambda: tab.js("document.body.dataset.done === '1'"))
    tab.js(f"document.getElementById('status').textContent += {json.dumps(' · true class: ' + true_class)}")
    time.sleep(0.5)  # the bars' width transition
    rows = tab.js("[...document.querySelectorAll('#bars .row')].map(r => ({label: r.querySelector('.label')"
                  ".textContent, percent: r.querySelector('.prob').textContent}))")
    shot = tab.call("Page.captureScreenshot", format="png")["data"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(shot))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(CHECKPOINT),
                   help="checkpoint or models:/NAME/VERSION of a CIFAR-100 model (default: the committed 200-epoch MBIB cell)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store holding a models:/ checkpoint (default ./mlflow.db)")
    p.add_argument("--index", type=int, default=4321, help="which test image (in the zip's sorted order) to upload")
    p.add_argument("--out", default="bench/results/classifier_page.png")
    p.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = p.parse_args(argv)

    import httpx
    import mlflow
    import ray
    from ray import serve

    from mbib import tracking
    from mbib.serving import ServeSettings, build_app

    root = resolve_data_root(None)  # export's parity check reads the same data set from there
    if root is None or not (root / "cifar100.zip").is_file():
        print("error: no cifar100.zip: set MBIB_DATA_ROOT to the directory holding it", file=sys.stderr)
        return 2
    mlflow.set_tracking_uri(tracking.tracking_uri(args.tracking_uri))  # where models:/ resolves; export logs nothing
    with tempfile.TemporaryDirectory(prefix="mbib-page-") as tmp:
        model = Path(tmp) / "model.onnx"
        export_onnx(args.checkpoint, model)  # parity on the checkpoint's own test images (cifar100-lt)
        image, true_class = cifar_test_image(root / "cifar100.zip", args.index, Path(tmp))
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        http_port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
            serve.run(build_app(ServeSettings(model_path=str(model), num_cpus=0.5)), name="mbib", route_prefix="/")
            url = f"http://127.0.0.1:{http_port}/"
            answer = httpx.post(url + "classify", content=image.read_bytes(), headers={"content-type": "image/jpeg"},
                                timeout=60).json()
            rows = screenshot(url, image, true_class, Path(args.out), args.chromium)
        finally:
            serve.shutdown()
            ray.shutdown()
    expected = [(p["label"], f"{100 * p['probability']:.1f}%") for p in answer["predictions"]]
    drawn = [(r["label"], r["percent"]) for r in rows]
    print(f"page drew {drawn}")
    if drawn != expected:
        print(f"error: the page's bars {drawn} differ from POST /classify {expected}", file=sys.stderr)
        return 1
    print(f"screenshot: {args.out} (model {answer['model']['name']} version {answer['model']['version']}; "
          f"{image.name}, true class {true_class}, top-1 {drawn[0][0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
