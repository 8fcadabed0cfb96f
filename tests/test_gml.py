"""GML: contrastive term by hand, queue slots and FIFO order, temperature gradient routing, strong
augmentation, and that a few optimisation steps reduce the loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from mbib.data.strong_augment import AUGMENTATIONS, cutout, random_crop_flip, strong_augment
from mbib.errors import ConfigError
from mbib.methods.gml import (
    KEY_KEY,
    QUERY_KEY,
    ClassQueue,
    GMLCriterion,
    adjusted_cross_entropy,
    build_gml_model,
    gml_contrastive_logits,
    register_gml_methods,
    slot_sizes,
)
from mbib.methods import METHOD_MODEL_OPTIONS, METHODS, build_criterion


def _lme(values):
    return math.log(sum(math.exp(v) for v in values) / len(values))


def _hand_queue():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    valid = torch.tensor([True, True, True, False, False])  # class 2 has no valid key
    return keys, labels, valid


def test_contrastive_logits_match_hand_values():
    keys, labels, valid = _hand_queue()
    q = torch.tensor([[0.6, 0.8]])
    out = gml_contrastive_logits(q, keys, labels, valid, 3, torch.tensor(0.5))
    assert out[0, 0].item() == pytest.approx(_lme([0.6 / 0.5, 0.8 / 0.5]), abs=1e-6)
    assert out[0, 1].item() == pytest.approx(0.6 / 0.5, abs=1e-6)  # the invalid [0, 1] key is ignored
    assert out[0, 2].item() == float("-inf")
    per_class = gml_contrastive_logits(q, keys, labels, valid, 3, torch.tensor([0.5, 0.25, 1.0]))
    assert per_class[0, 1].item() == pytest.approx(0.6 / 0.25, abs=1e-6)  # T of the key's class
    counts = [3.0, 1.0, 1.0]
    log_prior = torch.tensor(counts).div(5.0).log()
    z = [_lme([1.2, 1.6]) + math.log(0.6), 1.2 + math.log(0.2)]
    expected = -(z[1] - math.log(math.exp(z[0]) + math.exp(z[1])))  # class 2 drops out of the softmax
    loss = adjusted_cross_entropy(out, torch.tensor([1]), log_prior)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_contrastive_logits_stay_finite_for_cold_temperatures():
    keys, labels, valid = _hand_queue()
    q = torch.tensor([[0.6, 0.8]], requires_grad=True)
    out = gml_contrastive_logits(q, keys, labels, valid, 3, torch.tensor(1e-3))
    assert out[0, 0].item() == pytest.approx(800.0 + math.log((math.exp(-200.0) + 1.0) / 2.0), rel=1e-6)
    adjusted_cross_entropy(out, torch.tensor([0]), torch.zeros(3)).backward()
    assert torch.isfinite(q.grad).all()


def test_slot_sizes_share_and_sum():
    assert slot_sizes([7, 1], 12, 2).tolist() == [9, 3]  # 2 + 8 * 7/8, 2 + 8 * 1/8
    counts = [round(500 * 0.01 ** (i / 99)) for i in range(100)]
    sizes = slot_sizes(counts, 4096, 2)
    assert sizes.sum().item() == 4096 and sizes.min().item() >= 2
    assert all(a >= b for a, b in zip(sizes.tolist(), sizes.tolist()[1:]))
    with pytest.raises(ConfigError):
        slot_sizes(counts, 150, 2)


def test_queue_keeps_slot_sizes_and_fifo_order():
    q = ClassQueue([7, 1], size=12, dim=1, base_k=2)
    sizes = q.sizes.clone()

    def push(values, classes):
        q.enqueue(torch.tensor(values, dtype=torch.float32)[:, None], torch.tensor(classes))

    push([1, 100, 2], [1, 0, 1])
    assert q.class_keys(1).squeeze(1).tolist() == [1, 2]
    push([3, 4, 101, 5], [1, 1, 0, 1])
    assert q.class_keys(1).squeeze(1).tolist() == [3, 4, 5]  # 1 and 2, the oldest, were overwritten
    push([6], [1])
    assert q.class_keys(1).squeeze(1).tolist() == [4, 5, 6]
    push([10, 11, 12, 13, 14], [1] * 5)  # more than the slot holds in one batch: the newest 3 stay
    assert q.class_keys(1).squeeze(1).tolist() == [12, 13, 14]
    assert q.class_keys(0).squeeze(1).tolist() == [100, 101]
    assert torch.equal(q.sizes, sizes) and q.valid.sum().item() == 5
    assert torch.equal(q.labels, torch.tensor([0] * 9 + [1] * 3))


def _filled_criterion(k=4, dim=8, per_class=True):
    crit = GMLCriterion("gml", "plain", [40, 20, 10, 5], queue_size=32, dim=dim, per_class_temperature=per_class)
    g = torch.Generator().manual_seed(0)
    crit.queue.enqueue(F.normalize(torch.randn(32, dim, generator=g), dim=1), torch.arange(32) % k)
    return crit


@pytest.mark.parametrize("per_class", [True, False])
def test_temperature_learns_only_from_detached_copy(per_class):
    crit = _filled_criterion(per_class=per_class)
    query = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    con, con_t = crit.contrastive_terms(query, labels)
    g_q, g_t = torch.autograd.grad(con, [query, crit.log_temperature], allow_unused=True)
    assert g_t is None and g_q.abs().sum() > 0
    g_q, g_t = torch.autograd.grad(con_t, [query, crit.log_temperature], allow_unused=True)
    assert g_q is None and g_t.abs().sum() > 0
    assert crit.no_weight_decay_params() == [crit.log_temperature]


def test_strong_augment_shapes_dtypes_and_determinism():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    before = torch.random.get_rng_state()
    a = strong_augment(x, mean, std, generator=torch.Generator().manual_seed(3))
    b = strong_augment(x, mean, std, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), before)  # the global stream is untouched
    assert a.shape == x.shape and a.dtype == torch.float32 and torch.equal(a, b)
    same = x[:1].expand(8, -1, -1, -1).contiguous()  # one image 8 times: per-image randomness differs
    outs = strong_augment(same, mean, std, generator=torch.Generator().manual_seed(1))
    assert len({o.sum().item() for o in outs}) > 1
    assert set(AUGMENTATIONS) == {"standard", "strong"}


def test_crop_flip_and_cutout_keep_each_image_in_its_row():
    b = 5
    x = torch.arange(1, b + 1, dtype=torch.uint8)[:, None, None, None].expand(b, 3, 32, 32).contiguous() * 40
    g = torch.Generator().manual_seed(0)
    y = cutout(random_crop_flip(x, generator=g), generator=g)
    assert y.shape == x.shape and y.dtype == torch.uint8
    for i in range(b):
        assert set(y[i].unique().tolist()) <= {0, 40 * (i + 1)}  # only its own value, or padding/hole zeros
    z = cutout(torch.full((4, 1, 32, 32), 255, dtype=torch.uint8), generator=g)
    for img in z[:, 0]:
        rows, cols = (img == 0).any(1), (img == 0).any(0)
        assert (img == 0).sum() == rows.sum() * cols.sum() and rows.sum() <= 16  # one clipped square


def test_crop_flip_is_a_window_of_the_padded_image():
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    y = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(3):
        windows = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(-1)) for w in windows)


def test_gml_steps_reduce_loss_on_random_features():
    torch.manual_seed(0)
    k, n = 4, 64
    feats = torch.randn(n, 16)
    labels = torch.arange(n) % k
    feats += 1.5 * F.one_hot(labels, 16).float()  # weakly separable
    encoder = torch.nn.Linear(16, 8)
    classifier = torch.nn.Parameter(torch.randn(k, 8))
    crit = GMLCriterion("gml", "plain", [30, 20, 10, 4], queue_size=32, dim=8)
    opt = torch.optim.SGD([*encoder.parameters(), classifier, crit.log_temperature], lr=0.05)

    def loss_of():
        q = F.normalize(encoder(feats), dim=1)
        cos = q @ F.normalize(classifier, dim=1).T
        return crit({"v1": cos, QUERY_KEY: q, KEY_KEY: q.detach()}, labels)

    first, terms = loss_of()
    assert set(terms) >= {"sup", "con", "con_T", "total"}
    for _ in range(30):
        opt.zero_grad()
        loss, _ = loss_of()
        loss.backward()
        opt.step()
    assert loss_of()[0].item() < 0.8 * first.item()


def test_gml_head_and_registered_methods_on_resnet32():
    register_gml_methods()
    register_gml_methods()  # idempotent
    assert METHODS["gml"] == "plain" and METHOD_MODEL_OPTIONS["gml"]["normed"] is True
    assert METHODS["mbib-gml"] == "mbib"
    counts = [20, 10, 5]
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 0])
    for method in ("gml", "mbib-gml"):
        head = build_gml_model("resnet32", 3, method=method)
        crit = build_criterion(method, counts, queue_size=64)
        head.train()
        out = head(x)
        loss, terms = crit(out, y)
        loss.backward()
        assert torch.isfinite(loss) and "con" in terms and crit.queue.valid.sum().item() == 6
        key_before = next(head.key_proj.parameters()).clone()
        with torch.no_grad():
            next(head.query_proj.parameters()).add_(1.0)
        head.momentum_update()
        assert torch.allclose(next(head.key_proj.parameters()), key_before + 0.001, atol=1e-6)
        assert all(not p.requires_grad for p in head.key_model.parameters())
        head.eval()
        assert set(head(x)) == set(head.model.output_keys)  # eval: logits only, like a plain model


def test_importing_mbib_methods_alone_registers_gml_without_the_training_loop():
    import subprocess
    import sys

    code = ("import sys, mbib.methods as M; print('gml' in M.METHODS and 'mbib-gml' in M.METHODS, "
            "any(m.startswith('mbib.train') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_per_query_mask_drops_a_key_for_that_query_only():
    keys, labels, valid = _hand_queue()
    q = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    mask = valid.expand(2, -1).clone()
    mask[1, 1] = False  # the second query may not use key 1 ([0, 1], class 0)
    out = gml_contrastive_logits(q, keys, labels, mask, 3, torch.tensor(0.5))
    assert out[0, 0].item() == pytest.approx(_lme([1.2, 1.6]), abs=1e-6)
    assert out[1, 0].item() == pytest.approx(1.2, abs=1e-6)  # only key 0 is left for class 0
    assert out[1, 1].item() == pytest.approx(1.2, abs=1e-6)


def test_temperature_copy_skips_the_query_images_own_keys():
    crit = GMLCriterion("gml", "plain", [2, 2], queue_size=6, dim=2, base_k=2, init_temperature=0.5)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    crit.queue.enqueue(keys, torch.tensor([0, 0, 1, 1]), index=torch.tensor([10, 11, 12, 13]))
    assert sorted(crit.queue.index[crit.queue.valid].tolist()) == [10, 11, 12, 13]
    query, label = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    con, con_t = crit.contrastive_terms(query, label, index=torch.tensor([10]))
    log_prior = [math.log(0.5), math.log(0.5)]
    both = [_lme([2.0, 0.0]) + log_prior[0], _lme([1.2, 1.6]) + log_prior[1]]  # encoder copy: all keys
    own_out = [0.0 + log_prior[0], both[1]]  # temperature copy: key 10 (the query's image) left out
    ce = lambda z: -(z[0] - math.log(math.exp(z[0]) + math.exp(z[1])))  # noqa: E731
    assert con.item() == pytest.approx(ce(both), abs=1e-5)
    assert con_t.item() == pytest.approx(ce(own_out), abs=1e-5)
    crit.exclude_own_key = False
    assert crit.contrastive_terms(query, label, index=torch.tensor([10]))[1].item() == pytest.approx(ce(both), abs=1e-5)


def test_query_view_and_key_view_feed_their_own_outputs():
    torch.manual_seed(0)
    head = build_gml_model("resnet32", 3, method="gml").train()
    for m in head.modules():  # BN in eval mode so the shared backbone pass is comparable image by image
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.eval()
    x, xq, xk = (torch.randn(2, 3, 32, 32) for _ in range(3))
    three = head(x, xq, xk)
    assert torch.allclose(three["v3"], head(x)["v3"], atol=1e-5)  # classifier logits: view 1
    assert torch.allclose(three[QUERY_KEY], head(xq)[QUERY_KEY], atol=1e-5)  # query: view 2
    assert torch.allclose(three[KEY_KEY], head(xk)[KEY_KEY], atol=1e-5)  # key: view 3
    assert not torch.allclose(three[QUERY_KEY], head(x)[QUERY_KEY], atol=1e-3)


def _tiny_data(n=48, k=3):
    from mbib.data import ImageData

    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % k
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return ImageData(name="tiny", x_train=x, y_train=y, x_test=x[:12], y_test=y[:12], classes=["a", "b", "c"],
                     class_counts=torch.bincount(y, minlength=k).tolist(), mean=(0.5,) * 3, std=(0.25,) * 3)


def _gml_config(method="mbib-gml", views=3, batch=8):
    from mbib.config import TrainConfig, apply_overrides

    return apply_overrides(TrainConfig(), {"loss.method": method, "loss.gml_views": views, "optim.batch_size": batch,
                                           "optim.warmup_epochs": 1, "optim.lr": 0.01})


def test_engine_ramps_mbib_gml_vsd_weight_and_feeds_three_views():
    from mbib.config import apply_overrides
    from mbib.train.engine import Engine

    engine = Engine(apply_overrides(_gml_config(), {"loss.gml_weight": 0.3}), _tiny_data(), torch.device("cpu"))
    assert engine.task.ramp.beta == 5.0 and engine.task.views == 3 and engine.task.criterion.con_weight == 0.3
    batches = engine.epoch_batches(0)
    first = next(batches)
    assert len(first.views) == 2 and all(v.shape == first.x.shape for v in first.views)
    assert not torch.equal(first.views[0], first.x)  # separate draws of the augmentation
    engine.train_step(first)
    assert engine.task.criterion.base.beta == 0.0  # step 0 of a one-epoch (6-step) ramp
    engine.train_step(next(batches))
    assert engine.task.criterion.base.beta == pytest.approx(5.0 / 6)
    queue = engine.task.criterion.queue
    assert sorted(queue.index[queue.valid].tolist()) == sorted(
        torch.cat([first.index, engine.source.batches.shard_indices()[8:16]]).tolist())


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mbib.train.engine import Engine

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    engine = Engine(_gml_config("gml", batch=8), _tiny_data(), torch.device("cpu"), rank=rank, world_size=world,
                    wrap_model=DistributedDataParallel)
    batches = engine.epoch_batches(0)
    for _ in range(2):
        engine.train_step(next(batches))
    q = engine.task.criterion.queue
    torch.save({"checksum": engine.param_checksum(), "keys": q.keys.clone(), "index": q.index.clone(),
                "log_t": engine.task.criterion.log_temperature.detach().clone()}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_ddp_ranks_share_one_queue_and_temperature(tmp_path):
    import torch.multiprocessing as mp

    from mbib.raylocal import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert torch.equal(a["keys"], b["keys"]) and torch.equal(a["index"], b["index"])
    assert (a["index"] >= 0).sum().item() == 16  # 2 steps x 2 ranks x 4 images, gathered into both queues
    assert torch.equal(a["log_t"], b["log_t"]) and a["checksum"] == b["checksum"]


def test_gml_brings_its_published_recipe_and_reproductions_apply_it():
    from mbib.methods import method_recipe
    from mbib.reproduction.grid import grid_cell

    assert method_recipe("gml") == method_recipe("mbib-gml") == {"data.augment": "strong"}  # AutoAugment + Cutout
    assert method_recipe("mbib") == {} and dict(grid_cell("mbib", 100.0).overrides) == {}
    assert dict(grid_cell("gml", 100.0).overrides) == {"data.augment": "strong"}
