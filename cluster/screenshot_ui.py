"""Screenshots of a study in the MLflow UI through headless Chromium (Debian's `chromium` + `chromium-driver`).

    python cluster/screenshot_ui.py http://127.0.0.1:5000 digits-lt-mbib-smoke docs/img

Drives chromedriver over its W3C HTTP API (no Selenium needed): the experiment's run list with the parent runs
expanded (nested trials visible) and a parent run's plots. Waits for the page's own text, not for fixed times.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from mbib.raylocal import free_port

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


class Browser:
    def __init__(self, width: int, height: int):
        self.port, self.profile = free_port(), tempfile.mkdtemp(prefix="mbib-chromium-")
        self.proc = subprocess.Popen(["chromedriver", f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": "/usr/bin/chromium", "args": [*FLAGS, f"--user-data-dir={self.profile}",
                                                    f"--window-size={width},{height}"]}}}}
        for _ in range(100):
            try:
                self.session = self._call("POST", "/session", caps)["sessionId"]
                break
            except OSError:
                time.sleep(0.2)

    def _call(self, method: str, path: str, body: dict | None = None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=json.dumps(body or {}).encode() if method == "POST" else None,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())["value"]

    def js(self, script: str, *args):
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    def open(self, url: str, wait_for: str, timeout_s: float = 90) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})
        deadline = time.time() + timeout_s
        while wait_for not in (self.js("return document.body.innerText") or ""):
            if time.time() > deadline:
                raise TimeoutError(f"{url} never showed {wait_for!r}")
            time.sleep(0.5)
        time.sleep(2)  # let charts and images finish drawing

    def click_all(self, selector: str) -> int:
        return self.js(f"const els = [...document.querySelectorAll({json.dumps(selector)})];"
                       "els.forEach(e => e.click()); return els.length;")

    def shot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot")))
        print(f"  screenshot {path}")

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.proc.terminate()
            self.proc.wait()


def main(uri: str, experiment: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    b = Browser(1500, 900)
    try:
        b.open(f"{uri}/#/experiments/{exp.experiment_id}/runs", parent.info.run_name)
        b.click_all('[aria-label="Close"], button[aria-label*="lose assistant"]')  # the assistant side panel
        b.click_all('button[data-component-id*="runnamecellrenderer"]')  # expand the parents: nested trials
        time.sleep(2)
        b.shot(out_dir / "mlflow-runs.png")
        b.open(f"{uri}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts/plots/beta_curve.png",
               "beta_curve.png")
        b.shot(out_dir / "mlflow-parent-plots.png")
    finally:
        b.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
