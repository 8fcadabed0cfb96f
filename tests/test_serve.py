"""The Ray Serve app for real: local Ray, one Serve start per module, HTTP through httpx; no mocks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import digits, listener_name, normalise  # noqa: E402

from mbib.checkpoint import model_from_checkpoint  # noqa: E402
from mbib.errors import ConfigError  # noqa: E402
from mbib.models import ensemble_logits  # noqa: E402
from mbib.raylocal import free_port  # noqa: E402
from mbib.classifier import cuda_present, resize_for_model, to_model_input  # noqa: E402
from mbib.serving import ServeSettings, build_app  # noqa: E402

BODY_LIMIT = 200_000
PIXEL_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def service(exported, ray_local):
    from ray import serve

    from mbib.serving import ServeSettings, build_app

    model, state = model_from_checkpoint(exported["ckpt"])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(model_path=str(exported["onnx"]), num_replicas=1, num_cpus=0.5, max_batch_size=8,
                             batch_wait_timeout_s=0.01, max_body_bytes=BODY_LIMIT, max_image_pixels=PIXEL_LIMIT)
    serve.run(build_app(settings), name="mbib", route_prefix="/")
    with httpx.Client(base_url=base, timeout=60) as client:
        yield {"client": client, "model": model, "spec": state["data_spec"], "base": base, "port": port}
    serve.shutdown()  # the session's Ray stays up for the other test modules


def test_the_default_ingress_is_haproxy_where_installed(service):
    """Every test of this module runs through the product's default ingress: HAProxy (bundled by ray[serve])."""
    from mbib.ingress import HA_PROXY, haproxy_binary

    if haproxy_binary() is None or not Path("/proc/net/tcp").exists():
        pytest.skip("no HAProxy binary here, or no /proc to see who listens")
    assert os.environ.get(HA_PROXY) == "1", "conftest's Ray should have started with the default ingress"
    assert listener_name(service["port"]) == "haproxy"  # HAProxy takes the HTTP port, not Ray's proxy actor
    _healthy(service)


@pytest.mark.parametrize("value, binary, expected, env_after", [
    (None, "bundled", "haproxy", "1"),    # nothing chosen, HAProxy installed: the fast ingress
    ("0", "bundled", "proxy", "0"),       # the way back, kept
    ("1", "bundled", "haproxy", "1"),
    (None, "missing", "proxy", None),     # nothing installed: Ray's proxy, nothing set
])
def test_prefer_haproxy_sets_the_default_only_where_nothing_was_chosen(tmp_path, value, binary, expected, env_after):
    from mbib.ingress import HA_PROXY, prefer_haproxy

    exe = tmp_path / "haproxy"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    environ = {"RAY_SERVE_HAPROXY_BINARY_PATH": str(exe if binary == "bundled" else tmp_path / "none")}
    if value is not None:
        environ[HA_PROXY] = value
    assert prefer_haproxy(environ) == expected and environ.get(HA_PROXY) == env_after


def test_prepare_ingress_waits_for_a_slow_proxy_unless_the_user_chose(tmp_path):
    from mbib.ingress import HA_PROXY, READY_CHECK, prepare_ingress

    environ = {"RAY_SERVE_HAPROXY_BINARY_PATH": str(tmp_path / "none")}
    assert prepare_ingress(environ) == "proxy" and environ[READY_CHECK] == "60"
    chosen = {"RAY_SERVE_HAPROXY_BINARY_PATH": str(tmp_path / "none"), READY_CHECK: "7", HA_PROXY: "0"}
    prepare_ingress(chosen)
    assert chosen[READY_CHECK] == "7" and chosen[HA_PROXY] == "0"


def test_rays_serve_controller_sees_the_patient_readiness_check(ray_local):
    """conftest prepares the ingress before ray.init: a Ray process (where the controller runs) reads 60 s, not
    Serve's 5 s that killed the starting proxy on a loaded machine."""
    @ray_local.remote
    def ready_check_s():
        from ray.serve._private.constants import PROXY_READY_CHECK_TIMEOUT_S

        return PROXY_READY_CHECK_TIMEOUT_S

    assert ray_local.get(ready_check_s.remote()) == 60.0


@pytest.mark.timeout(600)
def test_the_way_back_to_rays_proxy_serves_the_same_guarantees(exported, tmp_path):
    """RAY_SERVE_ENABLE_HA_PROXY=0 `serve run CONFIG` from another folder: Ray's proxy answers, and refuses alike."""
    import signal
    import time

    import yaml

    port = free_port()
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "mbib", "route_prefix": "/", "import_path": "mbib.serve_app:app",
                                "args": {"model_path": str(exported["onnx"]), "num_replicas": 1, "num_cpus": 0.5,
                                         "max_body_bytes": BODY_LIMIT}}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_SERVE_ENABLE_HA_PROXY": "0"}  # a Ray of its own
    proc = subprocess.Popen(["serve", "run", "config.yaml"], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        if Path("/proc/net/tcp").exists():
            assert listener_name(port) != "haproxy"
        png = _encode(digits(1, "test")[0][0].permute(1, 2, 0).numpy(), "PNG")
        ok = httpx.post(f"{base}/classify", content=png, headers={"content-type": "image/png"}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 5
        big = httpx.post(f"{base}/classify", content=b"x" * (BODY_LIMIT + 1), headers={"content-type": "image/png"},
                         timeout=60)
        assert big.status_code == 413 and "error" in big.json()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # serve run shuts Serve and its Ray down on Ctrl-C
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _torch_probs(service, hwc_uint8: np.ndarray) -> np.ndarray:
    """PyTorch's ensemble probabilities for [N, 32, 32, 3] uint8 pixels, normalised as in training."""
    x = normalise(torch.from_numpy(hwc_uint8).permute(0, 3, 1, 2), service["spec"]["mean"], service["spec"]["std"])
    with torch.no_grad():
        return torch.softmax(ensemble_logits(service["model"](x)), dim=1).numpy()


def _assert_matches(predictions: list[dict], expected: np.ndarray, k: int) -> None:
    assert len(predictions) == k
    assert predictions[0]["index"] == int(expected.argmax())
    for p in predictions:  # every returned probability is PyTorch's, and in descending order
        assert p["label"] == str(p["index"]) and abs(p["probability"] - expected[p["index"]]) < 1e-4
    assert [p["probability"] for p in predictions] == sorted((p["probability"] for p in predictions), reverse=True)


def _healthy(service) -> None:
    response = service["client"].get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


@pytest.fixture(scope="module")
def test_pixels() -> np.ndarray:
    return digits(6, "test")[0].permute(0, 2, 3, 1).numpy()  # [6, 32, 32, 3] uint8


def test_png_and_jpeg_bodies_give_pytorchs_prediction(service, test_pixels):
    client = service["client"]
    expected_png = _torch_probs(service, test_pixels)
    jpegs = [_encode(img, "JPEG", quality=90) for img in test_pixels]
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
    expected_jpeg = _torch_probs(service, decoded)
    for i, image in enumerate(test_pixels):
        response = client.post("/classify", content=_encode(image, "PNG"), headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"]["name"] == "resnet32" and body["model"]["version"] == "1"  # models:/tiny/1's version
        _assert_matches(body["predictions"], expected_png[i], 5)
        response = client.post("/classify", params={"top_k": 3}, content=jpegs[i], headers={"content-type": "image/jpeg"})
        assert response.status_code == 200, response.text
        _assert_matches(response.json()["predictions"], expected_jpeg[i], 3)


def test_multipart_single_and_batch_keep_order(service, test_pixels):
    client = service["client"]
    expected = _torch_probs(service, test_pixels)
    response = client.post("/classify", files={"file": ("d.png", _encode(test_pixels[0], "PNG"), "image/png")})
    assert response.status_code == 200, response.text
    _assert_matches(response.json()["predictions"], expected[0], 5)
    files = [("files", (f"d{i}.png", _encode(img, "PNG"), "image/png")) for i, img in enumerate(test_pixels)]
    response = client.post("/classify/batch", params={"top_k": 10}, files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [f"d{i}.png" for i in range(len(test_pixels))]
    for result, probs in zip(results, expected):
        _assert_matches(result["predictions"], probs, 10)
        assert sum(p["probability"] for p in result["predictions"]) == pytest.approx(1.0, abs=1e-4)


def test_grey_rgba_palette_webp_and_any_size_are_accepted(service, test_pixels):
    client = service["client"]
    grey = test_pixels[1, :, :, 0]
    as_rgb = client.post("/classify", content=_encode(np.repeat(grey[:, :, None], 3, 2), "PNG")).json()
    assert client.post("/classify", content=_encode(grey, "PNG")).json()["predictions"] == as_rgb["predictions"]
    rgba = np.dstack([test_pixels[1], np.full((32, 32), 255, np.uint8)])  # opaque alpha changes nothing
    assert client.post("/classify", content=_encode(rgba, "PNG")).json()["predictions"] == as_rgb["predictions"]
    palette = io.BytesIO()
    Image.fromarray(grey).convert("P").save(palette, format="PNG")
    big = np.asarray(Image.fromarray(test_pixels[2]).resize((300, 180)))
    for body in (palette.getvalue(), _encode(big, "WEBP"), _encode(test_pixels[3, :20, :], "JPEG")):
        response = client.post("/classify", content=body)
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == 5


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG declaring width x height pixels: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bad_requests(test_pixels):
    png = _encode(test_pixels[0], "PNG")
    zeros = np.zeros((1200, 1000), np.uint8)  # 1.2 Mpx, compresses to a few kB: under the body limit
    return {
        "empty body": (400, dict(content=b"")),
        "not an image": (415, dict(content=b"hello, this is not an image at all")),
        "truncated png": (400, dict(content=png[: len(png) // 2])),
        "truncated jpeg": (400, dict(content=_encode(test_pixels[0], "JPEG")[:200])),
        "bomb over the pixel limit": (413, dict(content=_encode(zeros, "PNG"))),
        "bomb far over PIL's own limit": (413, dict(content=_png_header_only(100_000, 100_000))),
        "body over the size limit": (413, dict(content=b"\0" * (BODY_LIMIT + 1))),
        "unknown multipart field": (422, dict(files={"image": ("d.png", png, "image/png")})),
        "text multipart field": (422, dict(files={"file": (None, "not a file")})),
        "top_k zero": (422, dict(content=png, params={"top_k": 0})),
        "top_k above classes": (422, dict(content=png, params={"top_k": 11})),
        "top_k not a number": (422, dict(content=png, params={"top_k": "many"})),
    }


@pytest.mark.parametrize("case", list(_bad_requests(np.zeros((1, 32, 32, 3), np.uint8))))
def test_bad_input_gets_status_and_json_error_and_service_stays_up(service, test_pixels, case):
    status, request = _bad_requests(test_pixels)[case]
    response = service["client"].post("/classify", **request)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and error and "\n" not in error
    _healthy(service)


def test_chunked_body_over_limit_is_refused_by_actual_length(service):
    def chunks():  # no Content-Length: the limit must hold on the bytes that arrive
        for _ in range(5):
            yield b"\0" * (BODY_LIMIT // 4)
    response = service["client"].post("/classify", content=chunks())
    assert response.status_code == 413 and "limit" in response.json()["error"]
    response = service["client"].post("/classify/batch", files=[("files", ("x.txt", b"nope", "text/plain"))])
    assert response.status_code == 415 and response.json()["error"].startswith("x.txt:")
    _healthy(service)


def test_metadata_and_openapi(service):
    client = service["client"]
    meta = client.get("/metadata").json()
    assert meta["classes"] == [str(i) for i in range(10)] and meta["input"]["image_size"] == 32
    assert meta["input"]["mean"] == pytest.approx(service["spec"]["mean"])
    gpu = cuda_present() and "CUDAExecutionProvider" in ort.get_available_providers()
    assert meta["providers"][0] == ("CUDAExecutionProvider" if gpu else "CPUExecutionProvider")  # CUDA asked for only with a GPU
    assert meta["model"]["source"] == "models:/tiny/1"  # the exported model's origin (conftest.py's `exported`)
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/classify", "/classify/batch", "/healthz", "/metadata"} <= set(paths)
    assert "image/png" in paths["/classify"]["post"]["requestBody"]["content"]


def _batch_files(service, files, top_k=10):
    return service["client"].post("/classify/batch", params={"top_k": top_k},
                                  files=[("files", (name, data, "application/octet-stream")) for name, data in files])


def test_batch_answers_every_file_in_order_with_errors_for_bad_ones(service, test_pixels):
    png = [_encode(img, "PNG") for img in test_pixels[:3]]
    files = [("a.png", png[0]), ("text.txt", b"not an image"), ("b.png", png[1]), ("cut.png", png[2][: len(png[2]) // 2]),
             ("empty.png", b""), ("c.png", png[2])]
    response = _batch_files(service, files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [name for name, _ in files]
    assert [r.get("status") for r in results] == [None, 415, None, 400, 400, None]
    assert all("\n" not in r["error"] and "predictions" not in r for r in results if "status" in r)
    expected = _torch_probs(service, test_pixels[:3])
    for result, probs in zip([results[0], results[2], results[5]], expected):
        _assert_matches(result["predictions"], probs, 10)
    response = _batch_files(service, [("x.txt", b"nope"), ("y.png", png[0][:30])])  # nothing decodable: 4xx as a whole
    assert response.status_code == 415 and response.json()["error"].startswith("x.txt:") and "1 more" in response.json()["error"]
    _healthy(service)


def test_answers_do_not_depend_on_batching(service):
    """Each image alone, then all at once from many clients (batched by @serve.batch, as /healthz's counts show):
    the same probabilities."""
    pixels = digits(24, "test")[0].permute(0, 2, 3, 1).numpy()
    bodies = [_encode(img, "PNG") for img in pixels]
    client = service["client"]

    def classify(body: bytes) -> list[float]:
        response = client.post("/classify", params={"top_k": 10}, content=body)
        assert response.status_code == 200, response.text
        return [p["probability"] for p in sorted(response.json()["predictions"], key=lambda p: p["index"])]

    alone = np.array([classify(b) for b in bodies])
    before = client.get("/healthz").json()["batch_sizes"]
    with ThreadPoolExecutor(len(bodies)) as pool:  # twice over: each image meets different neighbours
        together = np.array(list(pool.map(classify, bodies + bodies[::-1])))
    after = client.get("/healthz").json()
    calls = {int(size): count - before.get(size, 0) for size, count in after["batch_sizes"].items()}
    assert sum(size * count for size, count in calls.items()) == 2 * len(bodies)  # every image passed @serve.batch
    assert max(size for size, count in calls.items() if count) > 1  # and the concurrent ones shared model calls
    assert after["largest_batch"] == max(map(int, after["batch_sizes"])) <= 8  # the fixture's max_batch_size
    assert np.abs(together[: len(bodies)] - alone).max() < 1e-5
    assert np.abs(together[len(bodies):][::-1] - alone).max() < 1e-5
    assert len({int(a.argmax()) for a in alone}) > 1  # distinct answers: a mixed-up batch could not pass


def test_body_far_over_the_limit_gets_the_json_413_not_a_reset(service, test_pixels):
    """urllib sends the whole 64 MiB without `Expect: 100-continue`: the server must read it, then answer 413."""
    request = urllib.request.Request(service["base"] + "/classify", data=b"\0" * (64 << 20),
                                     headers={"content-type": "image/png"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=300)
    assert err.value.code == 413 and "limit" in json.loads(err.value.read())["error"]
    _healthy(service)


def test_unexpected_errors_answer_json_500():
    """The app's own handlers on a route that fails unexpectedly: JSON, one line, never Starlette's plain text."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from mbib.serving import api

    app = FastAPI(exception_handlers=api.exception_handlers)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("first line\nsecond line")

    response = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "internal error (RuntimeError: first line second line): retry, or report it"


@pytest.mark.parametrize("size,shape", [(224, (300, 180)), (224, (640, 481)), (224, (257, 1000)), (96, (50, 77))])
def test_crop_path_is_torchvisions_evaluation_transform_pixel_for_pixel(size, shape):
    from torchvision import transforms as T

    pixels = np.random.default_rng(size + shape[0]).integers(0, 256, (*shape[::-1], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(),
                          T.Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])])(image).numpy()
    got = to_model_input(image, size, np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3], np.float32))
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-6


def test_small_model_resize_matches_torch_antialiased_bilinear():
    from torchvision.transforms.v2 import functional as TF

    pixels = np.random.default_rng(1).integers(0, 256, (180, 300, 3), dtype=np.uint8)
    got = np.asarray(resize_for_model(Image.fromarray(pixels), 32)).astype(int)
    expected = TF.resize(torch.from_numpy(pixels).permute(2, 0, 1), [32, 32], antialias=True).permute(1, 2, 0).numpy()
    assert np.abs(got - expected.astype(int)).max() <= 1  # PIL and torch round differently by at most one level


def test_any_size_image_gets_pytorchs_answer_on_the_same_pixels(service, test_pixels):
    big = np.asarray(Image.fromarray(test_pixels[2]).resize((300, 180)))
    x = to_model_input(Image.fromarray(big), 32, np.asarray(service["spec"]["mean"], np.float32),
                       np.asarray(service["spec"]["std"], np.float32))
    with torch.no_grad():
        expected = torch.softmax(ensemble_logits(service["model"](torch.from_numpy(x)[None])), dim=1)[0].numpy()
    response = service["client"].post("/classify", params={"top_k": 10}, content=_encode(big, "PNG"))
    assert response.status_code == 200, response.text
    _assert_matches(response.json()["predictions"], expected, 10)


def _not_an_mbib_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["probs"])], "plain",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, 32, 32])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["B", 3, 32, 32])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), path)
    return path


@pytest.mark.parametrize("kind,expected", [("garbage", "is not a loadable ONNX model"),
                                           ("plain onnx", "lacks mbib metadata"),
                                           ("missing", "ONNX model not found")])
def test_invalid_model_fails_the_build_in_one_line(tmp_path, kind, expected):
    path = tmp_path / "model.onnx"
    if kind == "garbage":
        path.write_bytes(b"\x08\x07 this is not a protobuf" * 10)
    elif kind == "plain onnx":
        _not_an_mbib_model(path)
    with pytest.raises(ConfigError) as err:  # raised while building: before Serve deploys any replica
        build_app(ServeSettings(model_path=str(path)))
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("import_path, where", [("serve.app:app", "checkout"), ("mbib.serve_app:app", "elsewhere")])
def test_serve_run_with_an_invalid_model_prints_one_line(tmp_path, import_path, where):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not onnx")
    cwd = Path(__file__).parents[1] if where == "checkout" else tmp_path  # the installed builder runs from any folder
    result = subprocess.run(["serve", "run", import_path, f"model_path={bad}"], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {bad} is not a loadable ONNX model")


def test_a_registered_model_uri_is_exported_once_and_serves_the_same_outputs(exported, tmp_path, monkeypatch):
    import onnxruntime as ort

    from mbib.serve_app import app, registered_onnx

    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported["uri"])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "export")  # the export's record goes beside the fixture's
    monkeypatch.setenv("MBIB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MBIB_DATA_ROOT", raising=False)
    path = registered_onnx("models:/tiny/1")
    assert path.parent == tmp_path / "serve" and path.name == "models-tiny-1.onnx"
    images = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    ours, reference = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["probs"], {"images": images})[0]
                       for p in (path, exported["onnx"]))
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    stamp = path.stat().st_mtime_ns
    assert registered_onnx("models:/tiny/1") == path and path.stat().st_mtime_ns == stamp  # reused, not re-exported
    assert app({"model_path": "models:/tiny/1", "num_cpus": 0.5}) is not None  # `serve run ... model_path=models:/...`
    with pytest.raises(SystemExit, match=r"^error: cannot download models:/tiny/9"):
        app({"model_path": "models:/tiny/9"})


def test_config_file_build_in_a_ray_task_fails_with_the_reason(tmp_path, ray_local):
    from serve.app import app

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ray_local.exceptions.RayTaskError) as err:  # as Serve's controller builds a config's app
        ray_local.get(ray_local.remote(app).remote({"model_path": str(bad)}))
    assert isinstance(err.value.cause, RuntimeError)  # not SystemExit, which kills the worker and loses the reason
    reason = str(err.value.cause)
    assert reason.startswith(f"error: {bad} is not a loadable ONNX model") and "\n" not in reason


def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    eight = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(eight.astype(np.uint16) * 257).save(png, "PNG")  # the same picture at 16 bits
    sixteen = Image.open(io.BytesIO(png.getvalue()))
    assert sixteen.mode.startswith("I")
    mean, std = np.array([0.5, 0.5, 0.5], np.float32), np.array([0.25, 0.25, 0.25], np.float32)
    np.testing.assert_allclose(to_model_input(sixteen, 32, mean, std), to_model_input(Image.fromarray(eight), 32, mean, std))


def test_root_page_is_self_contained_html_that_posts_to_classify(service):
    response = service["client"].get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert 'type="file"' in page and 'id="drop"' in page  # the upload form and its drop zone
    assert 'base + "classify?top_k="' in page and 'base + "metadata"' in page  # the JS calls this app's endpoints
    assert "<script src" not in page and "<link" not in page and "http://" not in page and "https://" not in page


def test_replicas_and_batch_wait_from_settings():
    from mbib.serving import replicas_for

    assert ServeSettings.coerce({"num_replicas": "auto"}).num_replicas is None  # auto: decided by build_app
    assert ServeSettings().batch_wait_timeout_s == 0.0
    assert [replicas_for(2, 0, 1, 0), replicas_for(16, 0, 1, 0), replicas_for(16, 0, 4, 0), replicas_for(16, 0, 0.5, 0)] == [1, 15, 3, 15]
    assert [replicas_for(16, 2, 1, 1.0), replicas_for(16, 2, 1, 0.5)] == [2, 4]  # one per GPU share
    with pytest.raises(ConfigError, match="batch_wait_timeout_s=-0.1 is negative"):
        ServeSettings.coerce({"batch_wait_timeout_s": "-0.1"})


@pytest.fixture(scope="module")
def image_model(exported, tmp_path_factory):
    """The fixture's checkpoint registered as an MLflow Model (models:/digits/1) in a store of its own, as the
    study registers its best trial."""
    from mlflow.tracking import MlflowClient

    from mbib import tracking
    from mbib.mlflow_model import register_image_model

    tmp = tmp_path_factory.mktemp("mlflow-model")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(tracking.get_or_create_experiment(client, "study")).info.run_id
    client.set_terminated(run)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MBIB_DATA_ROOT", raising=False)
        version = register_image_model(client, run, exported["ckpt"], "digits")
    assert client.get_run(run).info.status == "FINISHED"  # registering did not reopen the run
    return {"uri": uri, "model_uri": f"models:/digits/{version}", "tmp": tmp}


def _pngs(test_pixels) -> list[bytes]:
    return [_encode(img, "PNG") for img in test_pixels]


@contextlib.contextmanager
def _in_store(uri: str):
    """MLflow's process-wide store set to `uri` (the export fixture set another), put back after."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}  # set_*_uri export these
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        for k, v in env.items():  # later tests' child processes must not inherit this store as their registry
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _load_pyfunc(image_model):
    import mlflow

    with _in_store(image_model["uri"]):
        return mlflow.pyfunc.load_model(image_model["model_uri"])


def test_the_registered_mlflow_model_answers_as_the_serve_endpoint_and_keeps_its_checkpoint(service, image_model,
                                                                                            test_pixels):
    import mlflow
    import pandas as pd

    from mbib.export import export_onnx

    model = _load_pyfunc(image_model)
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image"]
    assert model.metadata.metadata["classes"] == [str(i) for i in range(10)] and model.metadata.metadata["image_size"] == 32
    pngs = _pngs(test_pixels)
    answers = model.predict(pd.DataFrame({"image": pngs}))
    served = [service["client"].post("/classify", content=p, headers={"content-type": "image/png"}).json()["predictions"][0]
              for p in pngs]
    assert answers["index"].tolist() == [s["index"] for s in served]
    assert answers["label"].tolist() == [s["label"] for s in served]
    assert np.abs(answers["probability"].to_numpy() - [s["probability"] for s in served]).max() < 1e-5
    assert len(set(answers["index"])) > 1  # distinct answers: a model answering one class could not pass
    with pytest.raises(mlflow.exceptions.MlflowException, match="not a PNG, JPEG or WebP"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))
    # the checkpoint is beside the model: `mbib export models:/...` still exports it
    with _in_store(image_model["uri"]):
        report = export_onnx(image_model["model_uri"], image_model["tmp"] / "again.onnx", record=False)
    assert report["passed"]


def test_the_mlflow_model_module_imports_without_mlflows_type_hint_warning():
    """MLflow warns at class definition when predict has no type hint; every study and `mbib` command imports it."""
    done = subprocess.run([sys.executable, "-W", "always", "-c", "import mbib.mlflow_model"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "Add type hints" not in done.stderr, done.stderr[-2000:]


@pytest.mark.timeout(600)
def test_mlflow_models_serve_answers_invocations_from_a_real_image(image_model, test_pixels, tmp_path):
    """MLflow's own scoring server on the registered version: JSON with base64 images in, the pyfunc's answers out,
    a broken image a JSON 400."""
    import base64
    import os
    import time

    import pandas as pd

    port = free_port()
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's mbib, which the model's code imports
    env = {**os.environ, "MLFLOW_TRACKING_URI": image_model["uri"], "MLFLOW_REGISTRY_URI": image_model["uri"],
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", image_model["model_uri"],
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env=env, cwd=tmp_path, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        pngs = _pngs(test_pixels)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p).decode()] for p in pngs]}}
        response = httpx.post(f"{base}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        got = pd.DataFrame(response.json()["predictions"])
        expected = _load_pyfunc(image_model).predict(pd.DataFrame({"image": pngs}))
        assert got["index"].tolist() == expected["index"].tolist() and got["label"].tolist() == expected["label"].tolist()
        bad = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not an image").decode()]]}}
        response = httpx.post(f"{base}/invocations", json=bad, timeout=60)
        assert response.status_code == 400 and "not a PNG, JPEG or WebP" in response.json()["message"], response.text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)
