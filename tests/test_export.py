"""ONNX export: real torch.onnx (dynamo), onnx.checker, ONNX Runtime and a local MLflow registry; no mocks. The
exported model (conftest.py's `exported`) is the one test_serve.py serves."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import digits, normalise, write_parity_npz  # noqa: E402

from mbib import __version__  # noqa: E402
from mbib.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from mbib.errors import DataError  # noqa: E402
from mbib.export import EnsembleClassifier, check_parity, export_onnx, main, parity_failure  # noqa: E402
from mbib.models import ensemble_logits  # noqa: E402


def test_report_passes_parity_on_real_images_and_is_logged_to_mlflow(exported):
    import mlflow

    report = exported["report"]
    assert report["passed"] and report["exporter"] == "dynamo" and report["opset"] == 18
    assert report["images"] == "dataset:digits-lt" and report["batch_size"] == 24
    assert 0 <= report["max_abs_diff_logits"] <= 1e-4 and report["max_abs_diff_logits_batch1"] <= 1e-4
    assert report["top1_agreement"] == 1.0 and report["top_k_agrees"] and report["top_k"] == 5
    assert report["output_shapes"] == {"logits": [24, 10], "probs": [24, 10]}
    run_id = report["mlflow_run_id"]
    client = mlflow.MlflowClient(exported["uri"])
    assert {f.path for f in client.list_artifacts(run_id, "onnx")} == {"onnx/model.onnx", "onnx/parity_report.json"}
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="onnx/parity_report.json",
                                                                  tracking_uri=exported["uri"])).read_text())
    assert logged["max_abs_diff_logits"] == report["max_abs_diff_logits"]


def test_graph_names_dynamic_batch_and_metadata(exported):
    model = onnx.load(exported["onnx"])
    onnx.checker.check_model(model)
    (images,) = model.graph.input
    assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = images.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # symbolic batch, not a baked-in 2
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in model.graph.output] == ["logits", "probs"]
    for out in model.graph.output:
        assert out.type.tensor_type.shape.dim[0].dim_param and out.type.tensor_type.shape.dim[1].dim_value == 10
    meta = {p.key: p.value for p in model.metadata_props}
    spec = load_checkpoint(exported["ckpt"])["data_spec"]
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert json.loads(meta["mean"]) == pytest.approx(spec["mean"]) and json.loads(meta["std"]) == pytest.approx(spec["std"])
    assert meta["image_size"] == "32" and meta["model_name"] == "resnet32" and meta["source"] == "models:/tiny/1"
    assert meta["model_version"] == "1" and meta["mbib_version"] == __version__ and meta["exporter"] == "dynamo"
    # the checkpoint's own version (what a file export, not from the registry, serves as its version)
    assert meta["checkpoint_sha256_12"] == hashlib.sha256(Path(exported["ckpt"]).read_bytes()).hexdigest()[:12]


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_onnx_runtime_matches_pytorch_ensemble_at_any_batch_size(exported, batch):
    model, state = model_from_checkpoint(exported["ckpt"])
    spec = state["data_spec"]
    x = normalise(digits(batch, "test")[0], spec["mean"], spec["std"])
    with torch.no_grad():
        outputs = model(x)
    expected = ensemble_logits(outputs)
    # the ensemble really is the mean of the final tap head f and the z head g (Section 4.2)
    assert torch.allclose(expected, (outputs[model.tap_keys[-1]] + outputs["z"]) / 2)
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    logits, probs = session.run(["logits", "probs"], {"images": x.numpy()})
    assert logits.shape == (batch, 10) and probs.shape == (batch, 10)
    assert np.abs(logits - expected.numpy()).max() <= 1e-4
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(probs.argmax(1), expected.argmax(1).numpy())


def _broken(onnx_bytes: bytes, how: str) -> bytes:
    """The exported graph with one fault: a Relu dropped, or one output channel of a mid-network conv 10% off (the
    exporter folds BatchNorm into the conv, so this is a BN scale folded wrongly)."""
    model = onnx.load_from_string(onnx_bytes)
    if how == "dropped relu":
        [node for node in model.graph.node if node.op_type == "Relu"][-1].op_type = "Identity"
    else:
        convs = [node for node in model.graph.node if node.op_type == "Conv"]
        conv = convs[len(convs) // 2]
        weight = next(i for i in model.graph.initializer if i.name == conv.input[1])
        array = onnx.numpy_helper.to_array(weight).copy()
        array[0] *= 1.1
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    return model.SerializeToString()


def _parity_inputs(exported):
    model, state = model_from_checkpoint(exported["ckpt"])
    spec = state["data_spec"]
    return EnsembleClassifier(model).eval(), normalise(digits(24, "test")[0], spec["mean"], spec["std"])


@pytest.mark.parametrize("how", ["dropped relu", "wrong batchnorm folding"])
def test_parity_check_refuses_a_broken_graph(exported, how):
    wrapper, images = _parity_inputs(exported)
    sound = Path(exported["onnx"]).read_bytes()
    assert check_parity(sound, wrapper, images)["passed"]
    report = check_parity(_broken(sound, how), wrapper, images)
    assert not report["passed"] and report["max_abs_diff_logits"] > report["logit_bound"]
    assert parity_failure(report).startswith("ONNX Runtime's logits differ from PyTorch's by")


def test_model_with_large_logits_exports(exported, tmp_path):
    """Final heads scaled 1000x: logits in the thousands, float32 rounding far above 1e-4 in absolute terms."""
    state = load_checkpoint(exported["ckpt"])
    for key in ("heads.v3.weight", "heads.v3.bias", "heads.z.weight", "heads.z.bias"):  # f and g, the ensemble's heads
        state["model"][key] = state["model"][key] * 1000
    ckpt = save_checkpoint(state, tmp_path / "run")
    report = export_onnx(ckpt, tmp_path / "big.onnx", parity_images=_parity_inputs(exported)[1])
    assert report["passed"] and report["max_abs_logit"] > 1000 and (tmp_path / "big.onnx").is_file()
    assert report["max_abs_diff_logits"] <= report["logit_bound"] == pytest.approx(1e-4 * report["max_abs_logit"])
    assert report["top_k_agrees"] and report["max_abs_diff_probs"] <= 1e-4


def test_cli_refuses_to_write_a_broken_graph(exported, monkeypatch, capsys):
    from mbib import export

    real = export._export_bytes
    monkeypatch.setattr(export, "_export_bytes", lambda *a: (_broken(real(*a)[0], "dropped relu"), "dynamo"))
    out = exported["tmp"] / "refused.onnx"
    npz = write_parity_npz(exported["tmp"] / "parity.npz")
    code = main([str(exported["ckpt"]), "--out", str(out), "--parity-npz", str(npz)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert not list(out.parent.glob(".*.tmp-*"))  # no half-written temporary file left behind either
    assert err[-1].startswith("error: ONNX Runtime's logits differ") and "nothing written" in err[-1]
    assert main([str(exported["ckpt"]), "--out", str(out), "--tolerance", "-1"]) == 2  # a bound that refuses all
    assert "--tolerance -1 is out of range" in capsys.readouterr().err and not out.exists()


def test_missing_parity_images_and_checkpoint_are_one_line_errors(exported, tmp_path, capsys):
    state = load_checkpoint(exported["ckpt"])
    state["data_spec"] = {**state["data_spec"], "dataset": "cifar100-lt"}
    save_checkpoint(state, tmp_path / "ck")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MBIB_DATA_ROOT", str(tmp_path))  # no CIFAR-100 here
        with pytest.raises(DataError, match="--parity-npz"):
            export_onnx(tmp_path / "ck", tmp_path / "m.onnx")
    assert main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
