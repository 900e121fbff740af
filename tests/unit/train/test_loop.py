"""The one training loop: schedules, clipping, records, evaluation and checkpoint schedules, stopping."""

import pytest
import torch
from torch import nn

from moekit.train.loop import LoopConfig, StepOutput, TrainState, train
from moekit.train.schedules import inverse_sqrt


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    x, y = torch.randn(32, 3), torch.randn(32, 1)

    def step(i):
        rows = slice(4 * (i % 8), 4 * (i % 8) + 4)  # batch i is a function of i alone
        loss = (model(x[rows]) - y[rows]).pow(2).mean()
        return StepOutput(loss, {"loss": loss.item(), "only_even": i if i % 2 == 0 else None})

    return model, step


def test_trains_records_evaluates_and_checkpoints_on_schedule():
    model, step = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved, rates = [], []
    evaluations = iter(range(100))
    state = train(model, opt, TrainState(), LoopConfig(steps=7, checkpoint_every=3, eval_every=2), step,
                  lambda s: saved.append(s.step), desc="t", quiet=True,
                  lr=lambda i: rates.append(i) or 0.1, evaluate=lambda: {"score": next(evaluations)})
    assert state.step == 7 and state.elapsed_s > 0
    assert rates == list(range(7))  # the schedule sees the steps taken before each step
    assert state.history["train_step"] == [1, 2, 3, 4, 5, 6, 7]
    assert len(state.history["loss"]) == 7
    assert state.history["only_even"] == [0, 2, 4, 6]  # a None value is not recorded
    assert state.history["valid_step"] == [2, 4, 6, 7] and state.history["score"] == [0, 1, 2, 3]
    assert saved == [3, 6, 7]  # every 3 steps and after the last one
    assert model.training


def test_learning_rate_of_each_step_comes_from_the_schedule():
    model, step = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=123.0)
    seen = []

    def spy(i):
        seen.append(opt.param_groups[0]["lr"])
        return step(i)

    train(model, opt, TrainState(), LoopConfig(steps=4, checkpoint_every=10), spy, lambda s: None, desc="t",
          quiet=True, lr=inverse_sqrt(1.0, 2))
    # steps 1..4 of a 2-step warm-up: 1/2, 1, then sqrt(2/3) and sqrt(2/4)
    assert seen == pytest.approx([0.5, 1.0, (2 / 3) ** 0.5, 0.5**0.5])


def test_gradient_norm_is_clipped_before_the_optimizer_step():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)

    def step(i):  # d/dw of 100 * (w . [3, 4]) is [300, 400], norm 500
        return StepOutput(100 * model(torch.tensor([[3.0, 4.0]])).sum(), {})

    train(model, opt, TrainState(), LoopConfig(steps=1, checkpoint_every=1, clip=5.0), step, lambda s: None,
          desc="t", quiet=True)
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-3.0, -4.0]]))  # a step of norm 5


def test_resumes_from_a_state_and_continues_exactly():
    model, step = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    whole = train(model, opt, TrainState(), LoopConfig(steps=6, checkpoint_every=6), step, lambda s: None,
                  desc="t", quiet=True)
    want = [p.detach().clone() for p in model.parameters()]

    model, step = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = train(model, opt, TrainState(), LoopConfig(steps=3, checkpoint_every=6), step, lambda s: None,
                  desc="t", quiet=True)
    rest = train(model, opt, first, LoopConfig(steps=6, checkpoint_every=6), step, lambda s: None, desc="t",
                 quiet=True)
    assert rest.history["loss"] == whole.history["loss"] and rest.step == 6
    for got, expected in zip(model.parameters(), want, strict=True):
        assert torch.equal(got, expected)


def test_a_stop_request_checkpoints_the_finished_step_then_interrupts(stop_during_step):
    model, step = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = []
    stop_during_step(2)
    state = TrainState()
    with pytest.raises(KeyboardInterrupt, match="stopped after step 2 of t; checkpoint saved"):
        train(model, opt, state, LoopConfig(steps=5, checkpoint_every=10), step, lambda s: saved.append(s.step),
              desc="t", quiet=True)
    assert saved == [2] and state.step == 2


def test_train_state_round_trips_as_plain_data():
    state = TrainState(3, 1.5, {"loss": [1.0, 0.5, 0.25]})
    again = TrainState.from_dict(state.to_dict())
    assert again == state and again.history is not state.history
