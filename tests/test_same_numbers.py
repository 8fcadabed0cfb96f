"""Refactors and fast paths change no number: each registered method and data path, two fp32 steps, and an old
checkpoint resumed, against the values stored in same_numbers.json (tests/same_numbers.py writes them)."""

import json

import pytest
import torch

import same_numbers as sn

REFERENCE = json.loads(sn.REFERENCE.read_text())


@pytest.fixture(autouse=True)
def one_thread():
    """The reference was made on one thread: reductions split over threads may round otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same(got: dict, want: dict) -> None:
    # the starting weights are drawn from the seed: equal to the last bit
    assert got["checksum"] == pytest.approx(want["checksum"], rel=1e-12)
    for step, (g, w) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        assert sorted(g["terms"]) == sorted(w["terms"]), f"step {step}: other loss terms"
        assert g["terms"] == pytest.approx(w["terms"], rel=1e-5, abs=1e-7), f"step {step}"
        # what the step moved the weights by: tolerance for another CPU's rounding, far below a changed update
        moved, want_moved = g["checksum"] - got["checksum"], w["checksum"] - want["checksum"]
        assert moved == pytest.approx(want_moved, rel=1e-4), f"step {step}: weights moved otherwise"


def test_every_registered_method_has_reference_numbers():
    assert sorted(sn.case_name(*c) for c in sn.cases()) == sorted(REFERENCE["cases"])


@pytest.mark.parametrize("case", sn.cases(), ids=lambda c: sn.case_name(*c))
def test_two_steps_give_the_stored_numbers(case):
    assert_same(sn.run_case(*case), REFERENCE["cases"][sn.case_name(*case)])


def test_old_checkpoint_loads_and_resumes_to_the_stored_numbers():
    got, want = sn.resume_checkpoint(), REFERENCE["checkpoint"]
    assert (got["start_epoch"], got["global_step"]) == (want["start_epoch"], want["global_step"]) == (200, 17000)
    assert_same(got, want)
