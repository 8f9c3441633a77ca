"""Core pieces for segmentation models and CNNs: coupled costs, the exact greedy removal search,
per-pixel KD, feature-map MSE, mIoU, task/model target checks, and the real-image tasks."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from optin_plugins.scorers import distances as losses
from optin.errors import BudgetError, OptinError
from optin.measure import confusion, miou_of
from optin.recipe import check_target
from optin.tasks import Task, get_task
from optin.units import CostModel
from optin_plugins.searchers.ptf import PTFSearcher, greedy_prune


def _chain(channels: list[int], cost: float = 1.0) -> CostModel:
    """A chain of convs: conv 0 takes 3 fixed inputs, conv i couples layer i-1 and i."""
    n = len(channels)
    return CostModel(per_unit={"channels": [3.0 * cost] + [0.0] * (n - 1)}, counts={"channels": list(channels)},
                     pairs=[("channels", i - 1, "channels", i, cost) for i in range(1, n)])


def test_pairs_count_products_of_kept_units():
    costs = _chain([4, 6, 5])
    assert costs.macs() == 3 * 4 + 4 * 6 + 6 * 5
    assert costs.macs({"channels": [2, 3, 1]}) == 3 * 2 + 2 * 3 + 3 * 1
    kept = {"channels": [2, 3, 1]}
    for layer in range(3):
        fewer = {"channels": list(kept["channels"])}
        fewer["channels"][layer] -= 1
        assert costs.removal_cost(kept, "channels", layer) == pytest.approx(costs.macs(kept) - costs.macs(fewer))


def test_coupled_search_meets_budget_keeps_one_per_layer_and_prefers_important_units():
    costs = _chain([8, 8, 8])
    torch.manual_seed(0)
    scores = {"channels": [torch.rand(8) for _ in range(3)]}
    scores["channels"][1][:] = 100.0  # never worth removing while others remain
    for budget in (0.9, 0.6, 0.3):
        masks = PTFSearcher().search(scores, costs, budget)
        assert costs.macs_of_masks(masks) <= budget * costs.macs() + 1e-6
        assert all(int(m.sum()) >= 1 for m in masks["channels"])
    masks = PTFSearcher().search(scores, costs, 0.6)
    assert int(masks["channels"][1].sum()) == 8


def test_coupled_search_removes_in_ascending_importance_and_stops_as_soon_as_it_fits():
    costs = _chain([3, 3])
    where = [("channels", l, i) for l in range(2) for i in range(3)]
    removed = greedy_prune([0, 3, 1, 4, 2, 5], where, costs, capacity=costs.macs() - 1e-3)
    assert removed == {0}  # one removal (3 + 3 MACs saved) is enough


def test_unreachable_coupled_budget_is_a_clear_error():
    costs = _chain([2, 2])
    scores = {"channels": [torch.ones(2), torch.ones(2)]}
    with pytest.raises(BudgetError, match="keeping 1 unit"):
        PTFSearcher().search(scores, costs, 0.1)


def test_kd_on_per_pixel_logits_is_the_mean_pixel_kl():
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 3, 4)
    masked = torch.randn(3, 2, 5, 3, 4)
    got = losses.kd_divergence(masked, ref, temperature=2.0)
    flat_ref = ref.permute(0, 2, 3, 1).reshape(2, 12, 5)
    expect = []
    for r in range(3):
        q = masked[r].permute(0, 2, 3, 1).reshape(2, 12, 5)
        kl = F.kl_div(F.log_softmax(q / 2, -1), F.log_softmax(flat_ref / 2, -1), log_target=True,
                      reduction="none").sum(-1)  # (B, pixels)
        expect.append(kl.mean(1).sum() * 4)
    assert torch.allclose(got, torch.stack(expect).double(), atol=1e-5)
    assert losses.kd_divergence(ref.unsqueeze(0), ref).abs().max() < 1e-12


def test_feature_mse_compares_batch_averaged_maps():
    torch.manual_seed(0)
    ref = torch.randn(4, 3, 5, 5)
    masked = torch.cat([ref, ref + 1.0])  # replica 0 identical, replica 1 shifted by one everywhere
    got = losses.feature_mse(losses.batch_mean(masked, 2), losses.batch_mean(ref, 1)[0])
    assert torch.allclose(got, torch.tensor([0.0, 1.0]), atol=1e-6)


def test_miou_from_confusion():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 0]])
    conf = confusion(pred, target, 3)
    assert int(conf.sum()) == 6  # ignored pixels skipped
    # class 0: inter 1, union 3; class 1: inter 2, union 3; class 2: inter 1, union 2
    assert miou_of(conf) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert miou_of(confusion(target.clamp(max=2), target.clamp(max=2), 3)) == 1.0


class _Seg:
    name, output = "fake-seg", "segmentation"


def test_segmentation_model_on_classification_task_is_a_clear_error():
    task = Task("clf", "a classification task", ["a", "b"], lambda split: [])
    with pytest.raises(OptinError, match="segmentation model .* classification task; use a segmentation task"):
        check_target(_Seg(), task, "my-model")


def _has_fashion_mnist() -> bool:
    from optin_plugins.tasks.images import fashion_mnist_folder

    return (fashion_mnist_folder() / "t10k-images-idx3-ubyte.gz").is_file()


@pytest.mark.skipif(not _has_fashion_mnist(), reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
def test_mosaic_task_labels_exactly_the_lit_pixels_of_real_items():
    from optin_plugins.tasks.segmentation import LIT, mosaic_tensors
    from optin_plugins.tasks.images import MEAN, STD

    task = get_task("fmnist-mosaic")
    assert task.target == "segmentation" and task.metric == "miou" and task.num_labels == 11
    x, y = mosaic_tensors("test")
    assert x.shape == (1000, 1, 64, 64) and y.shape == (1000, 64, 64)
    raw = x * STD + MEAN
    assert torch.equal(y > 0, raw[:, 0] > LIT + 1e-6)
    assert set(y.unique().tolist()) == set(range(11))


def test_photos_tasks_are_real_unlabelled_crops():
    pytest.importorskip("skimage", reason="the photos tasks need scikit-image (pip install 'optin[photos]')")
    task = get_task("photos")
    assert task.metric == "agreement" and task.target == "classes"
    train, test = task.examples("train"), task.examples("test")
    assert train[0]["image"].shape == (3, 224, 224) and "label" not in train[0]
    assert len(train) >= 100 and len(test) >= 100
    assert not any(torch.equal(a["image"], b["image"]) for a, b in itertools.product(train[:5], test[:5]))
    assert get_task("photos-seg").target == "segmentation"


def test_min_keep_of_the_cost_model_stops_an_uncoupled_search_from_emptying_a_layer():
    costs = CostModel(per_unit={"channels": [1.0, 1.0]}, counts={"channels": [4, 4]}, min_keep={"channels": 1})
    scores = {"channels": [torch.full((4,), 0.01), torch.ones(4)]}
    masks = PTFSearcher().search(scores, costs, 0.5)
    assert [int(m.sum()) for m in masks["channels"]] == [1, 3]
    without = CostModel(per_unit={"channels": [1.0, 1.0]}, counts={"channels": [4, 4]})
    assert int(PTFSearcher().search(scores, without, 0.5)["channels"][0].sum()) == 0


def test_mean_normalisation_lets_layers_compete_by_relative_importance():
    costs = _chain([4, 4])
    # layer 1's scores are 100x smaller but its units 2 and 3 are, relative to their layer, the important ones
    scores = {"channels": [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.001, 0.002, 0.05, 0.05])]}
    plain = PTFSearcher().search(scores, costs, 0.5)
    normed = PTFSearcher(normalize="mean").search(scores, costs, 0.5)
    assert int(plain["channels"][1].sum()) == 1  # global ranking strips the small-scored layer
    assert int(normed["channels"][1].sum()) >= 2 and normed["channels"][1][2:].sum() == 2
    with pytest.raises(OptinError, match="normalize") as bad:  # a bad option, not a budget problem
        PTFSearcher(normalize="zscore")
    assert not isinstance(bad.value, BudgetError)


def test_adapters_search_defaults_reach_the_searcher_and_user_options_win(monkeypatch):
    import optin.recipe as recipe

    seen = []
    real = recipe.registry.create

    def spy(kind, name, options=None):
        obj = real(kind, name, options)
        if kind == "searcher":
            seen.append(obj.normalize)
        return obj

    class _Cnn:
        name, search_defaults = "fake-cnn", {"normalize": "mean", "not_a_ptf_option": 1}

        def cost_model(self, seq_len):
            return _chain([4, 4])

    monkeypatch.setattr(recipe.registry, "create", spy)
    scores = {"channels": [torch.rand(4), torch.rand(4)]}
    recipe.search(_Cnn(), scores, 0.8, 1.0)
    recipe.search(_Cnn(), scores, 0.8, 1.0, options={"normalize": "none"})
    assert seen == ["mean", "none"]


def test_agreement_can_count_only_confident_reference_predictions():
    from optin.measure import agreement

    class Fixed:
        def __init__(self, logits):
            self._logits = logits

        def logits(self, batch):
            return self._logits

    ref = Fixed(torch.tensor([[5.0, 0.0], [0.1, 0.0], [0.0, 5.0]]))  # example 1 is a near-tie
    other = Fixed(torch.tensor([[5.0, 0.0], [0.0, 0.1], [5.0, 0.0]]))
    assert agreement(other, ref, [{}]) == pytest.approx(1 / 3)
    assert agreement(other, ref, [{}], min_confidence=0.9) == pytest.approx(1 / 2)


def test_bad_ptf_options_are_clear_errors():
    for bad in (-1, 1.5, "two"):
        with pytest.raises(OptinError, match="min_keep must be a whole number >= 0") as info:
            PTFSearcher(min_keep=bad)
        assert not isinstance(info.value, BudgetError)  # a bad option, not a budget problem


def test_photos_without_scikit_image_say_how_to_install_it(monkeypatch):
    import sys

    from optin_plugins.tasks.segmentation import photos_folder

    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(OptinError, match=r"pip install 'optin\[photos\]'"):
        photos_folder()


def test_an_unknown_trajectory_distance_is_a_clear_error():
    from optin.contracts import Trace
    from optin_plugins.scorers.trajectory import TrajectoryScorer

    class Odd:
        name, trajectory_distance = "odd", "cosine"

        def unit_counts(self):
            return {"neurons": [2]}

        def trace(self, batch):
            return Trace(embeddings=[torch.zeros(1, 2, 3)], logits=torch.zeros(1, 2), valid=None)

    from optin.contracts import ScoreContext

    with pytest.raises(OptinError, match="trajectory distance 'cosine'; known: manifold, feature-mse"):
        TrajectoryScorer().score(Odd(), [{}], ScoreContext())
