"""``optin.lockstep``: forwards run as coroutines that stop at the same points; the driver sees every
pause in order, errors reach the driver, closing ends paused calls, and the driver's grad mode is its own."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from optin.lockstep import Lockstep


def test_calls_pause_in_turn_and_see_the_driver_changes():
    """Two forwards of a two-layer net stop before each layer; the driver changes layer 1's weights while both
    are stopped before it, and both go on with the new weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    xs = [torch.randn(4, 3), torch.randn(5, 3)]
    with Lockstep([lambda x=x: net(x) for x in xs]) as steps:
        hooks = [m.register_forward_pre_hook(lambda m, a, i=i: steps.pause((i, a[0]))) for i, m in enumerate(net)]
        seen = [steps.advance(j) for j in range(2)]
        assert [s[0] for s in seen] == [0, 0] and [s[1].shape[0] for s in seen] == [4, 5]
        seen = [steps.advance(j) for j in range(2)]
        assert [s[0] for s in seen] == [1, 1]
        with torch.no_grad():
            net[1].weight.zero_()
            net[1].bias.fill_(7.0)
        results = [steps.advance(j) for j in range(2)]
        for h in hooks:
            h.remove()
    assert results == [Lockstep.FINISHED, Lockstep.FINISHED]
    assert steps.advance(0) is Lockstep.FINISHED


def test_only_one_call_runs_at_a_time_and_gradients_are_off_inside_and_untouched_outside():
    running, most, order = [0], [0], []

    def busy(tag):
        running[0] += 1
        most[0] = max(most[0], running[0])
        order.append(tag)
        running[0] -= 1

    def call(j):
        assert not torch.is_grad_enabled()
        busy((j, 0))
        steps.pause(None)
        busy((j, 1))

    steps = Lockstep([lambda j=j: call(j) for j in range(4)])
    with steps:
        for _ in range(2):
            for j in reversed(range(4)):
                steps.advance(j)
                assert torch.is_grad_enabled()  # the driver's own mode between the calls' turns
    assert most[0] == 1 and torch.is_grad_enabled()
    assert order == [(j, 0) for j in reversed(range(4))] + [(j, 1) for j in reversed(range(4))]


def test_an_error_in_a_call_reaches_the_driver_and_close_ends_the_others():
    ended = []

    def fine():
        try:
            steps.pause("here")
        finally:
            ended.append(True)

    def broken():
        raise ValueError("bad input")

    steps = Lockstep([fine, broken, fine])
    with pytest.raises(ValueError, match="bad input"), steps:
        assert steps.advance(0) == "here"
        steps.advance(1)
    assert len(ended) == 1  # the paused call was stopped at its pause; the third never started
    assert not any(steps._calls)  # no call is left paused


def test_pause_outside_a_call_is_refused():
    steps = Lockstep([])
    with pytest.raises(RuntimeError):
        steps.pause(1)
