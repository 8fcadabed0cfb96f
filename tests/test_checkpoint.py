"""Checkpoints: versioned, atomic, and every way of loading a wrong or broken one is one line naming both sides."""

import pytest
import torch

import mbib
from mbib.checkpoint import (FORMAT, check_compatible, load_checkpoint, load_weights, model_from_checkpoint,
                             save_checkpoint)
from mbib.errors import TrainingError
from mbib.models import build_model
from mbib.tracking.registry import kept_checkpoint

SPEC10 = {"name": "resnet32", "num_classes": 10, "options": {"head": "mbib"}}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build_model("resnet32", 10, head="mbib")
    state = {"model": model.state_dict(), "model_spec": SPEC10, "data_spec": {"dataset": "digits-lt"}}
    return save_checkpoint(state, tmp_path_factory.mktemp("run") / "epoch_0001" / "checkpoint.pt")


def test_checkpoints_carry_format_and_version_and_newer_formats_are_refused(saved, tmp_path):
    state = load_checkpoint(saved)
    assert state["format"] == FORMAT and state["mbib_version"] == mbib.__version__
    old = {k: v for k, v in state.items() if k not in ("format", "mbib_version")}
    torch.save(old, tmp_path / "old.pt")  # format 0 (before versioning) has the same layout: still read
    assert model_from_checkpoint(tmp_path / "old.pt")[1]["model_spec"] == SPEC10
    torch.save({**state, "format": FORMAT + 1, "mbib_version": "9.0"}, tmp_path / "new.pt")
    with pytest.raises(TrainingError) as err:
        load_checkpoint(tmp_path / "new.pt")
    assert f"format {FORMAT + 1} from mbib 9.0" in one_line(err) and "upgrade mbib" in one_line(err)


def test_weights_for_another_class_count_are_one_line_naming_both_sides(saved):
    state = load_checkpoint(saved)
    with pytest.raises(TrainingError) as err:
        load_weights(build_model("resnet32", 100, head="mbib"), state["model"], state, "resnet32 with 100 classes", saved)
    message = one_line(err)
    assert "made for resnet32 (head=mbib) with 10 classes on digits-lt" in message
    assert "loaded into resnet32 with 100 classes" in message and "size mismatch" in message
    with pytest.raises(TrainingError) as err:  # a spec that lies about its weights: export/serving rebuild from it
        torch.save({**state, "model_spec": {**SPEC10, "num_classes": 100}}, saved.parent / "lying.pt")
        model_from_checkpoint(saved.parent / "lying.pt")
    assert "with 100 classes" in one_line(err)


@pytest.mark.parametrize("theirs,ours,dataset,expected", [
    (SPEC10, {**SPEC10, "num_classes": 100}, "digits-lt", "this run is resnet32 (head=mbib) with 100 classes on digits-lt"),
    (SPEC10, {**SPEC10, "name": "resnet10"}, "digits-lt", "this run is resnet10 (head=mbib)"),
    (SPEC10, SPEC10, "mnist-lt", "with 10 classes on mnist-lt"),
])
def test_another_architecture_or_data_set_is_refused_before_loading(saved, theirs, ours, dataset, expected):
    state = load_checkpoint(saved)
    check_compatible(state, SPEC10, "digits-lt", saved)  # its own description passes
    with pytest.raises(TrainingError) as err:
        check_compatible(state, ours, dataset, saved)
    assert "made for resnet32 (head=mbib) with 10 classes on digits-lt" in one_line(err) and expected in one_line(err)


def test_a_file_data_set_moved_to_another_folder_is_the_same_data_set(saved):
    state = load_checkpoint(saved)
    state["data_spec"]["dataset"] = "npz:/lab/alice/data/set.npz"
    check_compatible(state, SPEC10, "npz:/home/bob/set.npz", saved)  # the same file on another machine
    state["data_spec"]["dataset"] = "imagefolder:/lab/data/flowers/"
    check_compatible(state, SPEC10, "imagefolder:/mnt/flowers", saved)
    with pytest.raises(TrainingError, match="on imagefolder:/mnt/birds"):
        check_compatible(state, SPEC10, "imagefolder:/mnt/birds", saved)
    with pytest.raises(TrainingError, match="on npz:/lab/flowers"):  # another kind of data set, same name
        check_compatible(state, SPEC10, "npz:/lab/flowers", saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not-a-dict"])
def test_truncated_or_corrupt_checkpoint_is_one_line(saved, tmp_path, damage):
    data = saved.read_bytes()
    bad = tmp_path / "checkpoint.pt"
    if damage == "not-a-dict":
        torch.save([1, 2, 3], bad)
    else:
        bad.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 100, "empty": b""}[damage])
    with pytest.raises(TrainingError) as err:
        model_from_checkpoint(tmp_path)
    assert str(bad) in one_line(err)


def test_temporary_files_of_a_killed_writer_are_ignored_and_cleaned(saved, tmp_path):
    leftover = tmp_path / ".checkpoint.pt.tmp-abc123"  # what atomic_write leaves when killed mid-write
    leftover.write_bytes(saved.read_bytes()[:100])
    save_checkpoint(load_checkpoint(saved), tmp_path)
    assert not leftover.exists() and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert model_from_checkpoint(tmp_path)[1]["model_spec"] == SPEC10


def test_partial_epoch_folder_never_blocks_registration(saved, tmp_path):
    state = load_checkpoint(saved)
    for epoch, acc in ((1, 50.0), (2, 60.0)):
        save_checkpoint({**state, "metrics": {"acc": acc}}, tmp_path / f"epoch_{epoch:04d}" / "checkpoint.pt")
    (tmp_path / "epoch_0003").mkdir()  # a killed writer: a folder with nothing in it ...
    (tmp_path / "epoch_0004").mkdir()  # ... or half a checkpoint
    (tmp_path / "epoch_0004" / "checkpoint.pt").write_bytes(saved.read_bytes()[:1000])
    # the best report names a partial folder: the best readable sibling stands in
    assert kept_checkpoint(str(tmp_path / "epoch_0004")) == str(tmp_path / "epoch_0002")
    assert kept_checkpoint(str(tmp_path / "epoch_0009")) == str(tmp_path / "epoch_0002")
    assert kept_checkpoint(str(tmp_path / "epoch_0001")) == str(tmp_path / "epoch_0001")
