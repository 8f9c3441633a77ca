"""Plugin discovery by entry points, name resolution with helpful errors, runtime registration."""
from __future__ import annotations

import pytest

import optin
from optin import registry
from optin.contracts import Scorer
from optin.errors import OptinError, UnknownPluginError


def _names(kind: str) -> set[str]:
    return {i.name for i in registry.plugins(kind)}


def test_builtins_are_listed():
    infos = registry.plugins()
    by_kind = {}
    for i in infos:
        by_kind.setdefault(i.kind, set()).add(i.name)
    assert "bert" in by_kind["adapter"]
    assert {"trajectory", "magnitude", "fisher", "random"} <= by_kind["scorer"]
    assert "ptf" in by_kind["searcher"]


def test_builtins_are_available_and_point_at_the_plugins_package():
    infos = {(i.kind, i.name): i for i in registry.plugins()}
    for key in [("adapter", "bert"), ("scorer", "trajectory"), ("scorer", "magnitude"), ("scorer", "fisher"),
                ("scorer", "random"), ("searcher", "ptf")]:
        info = infos[key]
        assert info.available, f"{key} unavailable: {info.error}"
        assert info.target.startswith("optin_plugins."), info.target
        assert info.origin == "optin"
        assert info.summary  # first docstring line


def test_plugins_of_one_kind_only():
    infos = registry.plugins("scorer")
    assert infos and all(i.kind == "scorer" for i in infos)


def test_get_returns_the_classes():
    from optin_plugins.adapters.bert import BertAdapter
    from optin_plugins.scorers.trajectory import TrajectoryScorer
    from optin_plugins.searchers.ptf import PTFSearcher

    assert registry.get("scorer", "trajectory") is TrajectoryScorer
    assert registry.get("adapter", "bert") is BertAdapter
    assert registry.get("searcher", "ptf") is PTFSearcher


def test_unknown_name_lists_known_and_suggests():
    with pytest.raises(UnknownPluginError) as info:
        registry.get("scorer", "trajectry")
    msg = str(info.value)
    assert "'trajectry'" in msg
    for known in ("trajectory", "magnitude", "fisher", "random"):
        assert known in msg
    assert "did you mean 'trajectory'" in msg
    assert isinstance(info.value, OptinError)  # the CLI turns it into exit code 2


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(UnknownPluginError) as info:
        registry.get("searcher", "zzzzzz")
    assert "did you mean" not in str(info.value)
    assert "ptf" in str(info.value)


def test_unknown_kind_is_an_error():
    with pytest.raises(OptinError, match="kinds are"):
        registry.get("scorers", "trajectory")
    with pytest.raises(OptinError):
        registry.plugins("nope")


class _ConstantScorer(Scorer):
    """Every unit scores the same constant."""

    name = "constant-test"

    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def score(self, adapter, batches, ctx):
        import torch

        return {k: [torch.full((n,), self.value) for n in ns] for k, ns in adapter.unit_counts().items()}


class _Unavailable(_ConstantScorer):
    """Needs something this machine lacks."""

    @staticmethod
    def unavailable_reason():
        return "needs the frobnicator"


@pytest.fixture
def runtime_plugins():
    registry.register("scorer", "constant-test", _ConstantScorer)
    registry.register("scorer", "unavailable-test", _Unavailable)
    yield
    registry._local["scorer"].pop("constant-test", None)
    registry._local["scorer"].pop("unavailable-test", None)


def test_runtime_register(runtime_plugins, adapter):
    assert registry.get("scorer", "constant-test") is _ConstantScorer
    assert "constant-test" in registry.names("scorer")
    info = next(i for i in registry.plugins("scorer") if i.name == "constant-test")
    assert info.origin == "<runtime>" and info.available
    assert info.summary == "Every unit scores the same constant."
    # options the constructor declares are passed, others ignored
    obj = registry.create("scorer", "constant-test", {"value": 3.0, "neuron_group": 8})
    assert obj.value == 3.0
    # usable through the recipe
    scores = optin.score(adapter, [], scorer="constant-test", options={"value": 2.0})
    assert scores.values["heads"][0].tolist() == [2.0] * 4


def test_register_is_exported_at_top_level(runtime_plugins):
    assert optin.register is registry.register


def test_unavailable_plugin_is_listed_with_reason_and_refused(runtime_plugins):
    info = next(i for i in registry.plugins("scorer") if i.name == "unavailable-test")
    assert not info.available and info.error == "needs the frobnicator"
    with pytest.raises(OptinError, match="frobnicator"):
        registry.get("scorer", "unavailable-test")


def test_register_unknown_kind_is_refused():
    with pytest.raises(OptinError):
        registry.register("scorerz", "x", _ConstantScorer)


def test_check_options_accepts_known_keys():
    registry.check_options({"neuron_group": 4, "temperature": 2.0}, [("scorer", "trajectory"), ("searcher", "ptf")])
    registry.check_options({}, [("scorer", "magnitude")])


def test_check_options_rejects_unknown_key_listing_accepted():
    with pytest.raises(OptinError) as info:
        registry.check_options({"neuron_grup": 4}, [("scorer", "trajectory"), ("searcher", "ptf")])
    msg = str(info.value)
    assert "'neuron_grup'" in msg
    assert "did you mean 'neuron_group'" in msg
    for accepted in ("neuron_group", "temperature", "lambda_kd", "rows"):
        assert accepted in msg


def test_check_options_key_of_an_unselected_plugin_is_rejected():
    # neuron_group belongs to trajectory; with magnitude selected it is a typo-class error
    with pytest.raises(OptinError, match="neuron_group"):
        registry.check_options({"neuron_group": 8}, [("scorer", "magnitude"), ("searcher", "ptf")])


def test_check_options_unknown_plugin_name_raises_unknown_plugin():
    with pytest.raises(UnknownPluginError):
        registry.check_options({}, [("scorer", "nope")])
