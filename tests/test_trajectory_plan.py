"""The trajectory scorer's plan: its time estimate follows the timed forward pass and the timed masked restart,
and a job that does not fit ``target_minutes`` exactly moves the many units (neurons) to Gauss-Newton."""
from __future__ import annotations

import pytest

from conftest import make_batch, make_tiny_bert
from optin_plugins.adapters.bert import BertAdapter
from optin_plugins.scorers.trajectory import TrajectoryScorer
from optin_plugins.scorers.trajectory_plan import Plan


@pytest.fixture(scope="module")
def setup():
    ad = BertAdapter(make_tiny_bert())
    batch = make_batch(batch_size=8)
    return ad, batch, [ad.trace(batch)]


def _plan(setup, factor: float, forward: float = 0.01, minutes: float = 5.0) -> Plan:
    ad, _, traces = setup
    counts = ad.unit_counts()
    scorer = TrajectoryScorer(target_minutes=minutes)
    return scorer.make_plan(ad, list(counts), counts, len(counts["heads"]), traces, forward, factor)


def test_the_exact_estimate_grows_with_the_timed_restart(setup):
    one, three = _plan(setup, 1.0), _plan(setup, 3.0)
    assert one.estimator == three.estimator == {"heads": "exact", "neurons": "exact"}
    assert three.seconds == pytest.approx(3 * one.seconds)
    assert three.restart_factor == 3.0 and Plan.decode(three.encode()) == three


def test_restarts_slower_than_modelled_move_the_neurons_to_gauss_newton(setup):
    fits = _plan(setup, 1.0, forward=1.0)
    budget = fits.seconds / 60 * 1.5  # every unit exactly fits with the modelled restarts, not with 3x slower ones
    assert _plan(setup, 1.0, forward=1.0, minutes=budget).estimator["neurons"] == "exact"
    slow = _plan(setup, 3.0, forward=1.0, minutes=budget)
    assert slow.estimator == {"heads": "exact", "neurons": "gauss-newton"}


def test_a_plan_from_an_older_checkpoint_decodes_with_the_modelled_restarts(setup):
    plan = _plan(setup, 2.0)
    old = Plan(plan.estimator, plan.group, plan.probes, plan.seconds, plan.forward_seconds)
    assert Plan.decode(old.encode()).restart_factor == 1.0


def test_the_restart_is_timed_on_the_model(setup):
    ad, batch, traces = setup
    scorer = TrajectoryScorer(rows=16)
    from optin_plugins.scorers.trajectory import _Manifold

    probe = _Manifold(traces[0], 16, 0)
    factor = scorer.time_restart(ad, batch, traces[0], probe, "neurons", ad.unit_counts()["neurons"][0],
                                 len(ad.unit_counts()["neurons"]), 1e-3, traces)
    assert 0.25 <= factor <= 20.0
    assert scorer.time_restart(ad, batch, traces[0], probe, "neurons", 1, 3, 1e-3, traces) == 1.0  # nothing to time
