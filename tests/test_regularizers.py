"""Exactness of the regularizer callbacks against PyTorch's own optimizers.

Every trajectory runs through a real Lightning Trainer on MNIST-1D (640 training
examples, batch 32: 20 steps per epoch, 3 epochs = 60 optimizer steps). The
reference runs put the regularization inside PyTorch's optimizer instead
(``Adam(weight_decay=...)``, ``AdamW``, ``SGD(weight_decay=...)``), with the same
decay / no-decay parameter groups that the callbacks use.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything

from wdstudy.errors import WdstudyError
from wdstudy.regularizers import (
    DecoupledWeightDecay,
    L2Regularization,
    NoRegularization,
    make_regularizer,
    split_parameters,
)
from wdstudy.tasks import task_config
from wdstudy.train import Classifier, OptimizerConfig, make_trainer

LAM = 0.05
LR = 3e-3
EPOCHS = 3
TOL = 1e-6


@pytest.fixture(scope="module")
def task():
    # BatchNorm gives the CNN normalization parameters, which must not be regularized.
    return task_config("cnn-mnist1d", width=8, layers=2, batch_norm=True, batch_size=32, max_train=640, epochs=EPOCHS)


@pytest.fixture(scope="module")
def data(task):
    return task.load_data()


class RefClassifier(Classifier):
    """The same module, with an optimizer built by a test-supplied factory."""

    opt_factory = None
    penalty_in_loss = 0.0

    def make_optimizer(self):
        return self.opt_factory(self.model)

    def objective(self, loss):
        if self.penalty_in_loss:
            decay, _ = split_parameters(self.model)
            loss = loss + 0.5 * self.penalty_in_loss * sum(p.square().sum() for p in decay)
        return loss


class AutoRefClassifier(RefClassifier):
    """Lightning's automatic optimization (for gradient accumulation, which it implements)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.objective(F.cross_entropy(self.model(x), y))

    def on_train_epoch_end(self):
        pass


def groups(model, wd):
    decay, no_decay = split_parameters(model)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def fit(task, data, opt_factory, callbacks=(), schedule="cosine", clip=None, accumulate=1, penalty_in_loss=0.0):
    """Train through a real Trainer: the production module (manual optimization), or with
    ``accumulate`` > 1 Lightning's automatic optimization with gradient accumulation."""
    seed_everything(0, verbose=False)
    cls = AutoRefClassifier if accumulate > 1 else RefClassifier
    module = cls(
        task.build_model(), data, optimizer=OptimizerConfig(name="adam"), lr=LR, schedule=schedule,
        batch_size=task.batch_size, seed=0, grad_clip=clip,
    )
    module.opt_factory = opt_factory
    module.penalty_in_loss = penalty_in_loss
    extra = {"accumulate_grad_batches": accumulate} if accumulate > 1 else {}
    trainer = make_trainer(EPOCHS, list(callbacks), accelerator="cpu", **extra)
    trainer.fit(module)
    assert trainer.global_step >= 50 // accumulate
    return module.model


def max_diff(a, b):
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


adam = lambda wd: (lambda m: torch.optim.Adam(groups(m, wd), lr=LR))  # noqa: E731
adamw = lambda wd: (lambda m: torch.optim.AdamW(groups(m, wd), lr=LR))  # noqa: E731
sgd = lambda wd, mom: (lambda m: torch.optim.SGD(groups(m, wd), lr=LR * 10, momentum=mom))  # noqa: E731


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_l2_with_adam_equals_adam_weight_decay(task, data, schedule):
    ours = fit(task, data, adam(0.0), [L2Regularization(LAM)], schedule=schedule)
    ref = fit(task, data, adam(LAM), schedule=schedule)
    plain = fit(task, data, adam(0.0), schedule=schedule)
    assert max_diff(ours, ref) <= TOL
    assert max_diff(ours, plain) > 1e-4  # the regularization did something


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_decoupled_with_adam_equals_adamw(task, data, schedule):
    ours = fit(task, data, adam(0.0), [DecoupledWeightDecay(LAM * 10)], schedule=schedule)
    ref = fit(task, data, adamw(LAM * 10), schedule=schedule)
    plain = fit(task, data, adam(0.0), schedule=schedule)
    assert max_diff(ours, ref) <= TOL
    assert max_diff(ours, plain) > 1e-4


def test_l2_with_sgd_momentum_equals_sgd_weight_decay(task, data):
    ours = fit(task, data, sgd(0.0, 0.9), [L2Regularization(LAM)])
    ref = fit(task, data, sgd(LAM, 0.9))
    plain = fit(task, data, sgd(0.0, 0.9))
    assert max_diff(ours, ref) <= TOL
    assert max_diff(ours, plain) > 1e-4


def dist(a, b):
    return float(torch.sqrt(sum(((p - q).detach() ** 2).sum() for p, q in zip(a.parameters(), b.parameters()))))


def test_sgd_without_momentum_l2_equals_decoupled(task, data):
    """The textbook equivalence: w <- (1 - lr*lam) w - lr g either way."""
    sgd_l2 = fit(task, data, sgd(0.0, 0.0), [L2Regularization(LAM)])
    sgd_dec = fit(task, data, sgd(0.0, 0.0), [DecoupledWeightDecay(LAM)])
    plain = fit(task, data, sgd(0.0, 0.0))
    assert max_diff(sgd_l2, sgd_dec) <= TOL
    assert max_diff(sgd_l2, plain) > 1e-4


def test_l2_and_decoupled_differ_a_little_with_momentum_and_a_lot_with_adam(task, data):
    """How far L2's trajectory is from the nearest decoupled one, relative to L2's own effect.

    With momentum beta, L2's decay accumulates in the momentum buffer, so decoupled
    decay with lam / (1 - beta) nearly reproduces it. With Adam the L2 term is
    divided per coordinate by sqrt(v): no single decoupled lam comes close.
    """
    s = "constant"
    mom_l2 = fit(task, data, sgd(0.0, 0.9), [L2Regularization(LAM)], schedule=s)
    mom_effect = dist(mom_l2, fit(task, data, sgd(0.0, 0.9), schedule=s))
    mom_same = dist(mom_l2, fit(task, data, sgd(0.0, 0.9), [DecoupledWeightDecay(LAM)], schedule=s))
    mom_rescaled = dist(mom_l2, fit(task, data, sgd(0.0, 0.9), [DecoupledWeightDecay(LAM / (1 - 0.9))], schedule=s))
    assert mom_same > 10 * TOL  # they do differ
    assert mom_rescaled / mom_effect < 0.25  # but only a little

    adam_l2 = fit(task, data, adam(0.0), [L2Regularization(LAM)], schedule=s)
    adam_effect = dist(adam_l2, fit(task, data, adam(0.0), schedule=s))
    nearest = min(
        dist(adam_l2, fit(task, data, adam(0.0), [DecoupledWeightDecay(LAM * k)], schedule=s))
        for k in (1, 3, 10, 20, 30, 50, 100)
    )
    assert nearest / adam_effect > 0.3


def test_gradient_accumulation_regularizes_once_per_step(task, data):
    ours = fit(task, data, adam(0.0), [L2Regularization(LAM)], accumulate=2)
    ref = fit(task, data, adam(LAM), accumulate=2)
    assert max_diff(ours, ref) <= TOL
    ours = fit(task, data, adam(0.0), [DecoupledWeightDecay(LAM)], accumulate=2)
    ref = fit(task, data, adamw(LAM), accumulate=2)
    assert max_diff(ours, ref) <= TOL


def test_l2_is_added_before_gradient_clipping_like_a_loss_term(task, data):
    clip = 0.05  # small enough to clip nearly every step
    ours = fit(task, data, adam(0.0), [L2Regularization(LAM)], clip=clip)
    as_loss = fit(task, data, adam(0.0), penalty_in_loss=LAM, clip=clip)
    after_clip = fit(task, data, adam(LAM), clip=clip)  # Adam adds it after clipping
    assert max_diff(ours, as_loss) <= 1e-5
    assert max_diff(ours, after_clip) > 1e-4


def test_excluded_parameters_untouched(task):
    seed_everything(0, verbose=False)
    model = task.build_model()
    decay, no_decay = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert any("bias" in names[id(p)] for p in no_decay) and len(decay) == 3
    for cls in (L2Regularization, DecoupledWeightDecay):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = {id(p): (p.detach().clone(), p.grad.clone()) for p in model.parameters()}
        reg = cls(0.5)
        reg.attach(model, [opt])
        reg.apply(opt)
        for p in no_decay:
            assert torch.equal(p, before[id(p)][0]) and torch.equal(p.grad, before[id(p)][1])
        for p in decay:
            w0, g0 = before[id(p)]
            if cls is L2Regularization:
                assert torch.equal(p, w0) and torch.allclose(p.grad, g0 + 0.5 * w0)
            else:
                assert torch.equal(p.grad, g0) and torch.allclose(p, w0 * (1 - 0.1 * 0.5))
            p.data.copy_(w0)


def test_decay_all_regularizes_every_parameter(task):
    model = task.build_model()
    decay, no_decay = split_parameters(model, decay_all=True)
    assert no_decay == [] and len(decay) == len(list(model.parameters()))


def test_norm_and_penalty(task):
    model = task.build_model()
    reg = L2Regularization(0.2)
    reg.attach(model, [])
    decay, _ = split_parameters(model)
    sq = sum(float(p.detach().double().square().sum()) for p in decay)
    assert math.isclose(reg.weight_norm(), math.sqrt(sq), rel_tol=1e-12)
    assert math.isclose(reg.penalty(), 0.1 * sq, rel_tol=1e-12)
    dec = DecoupledWeightDecay(0.2)
    dec.attach(model, [])
    assert dec.penalty() is None and math.isclose(dec.weight_norm(), math.sqrt(sq), rel_tol=1e-12)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), "abc"])
def test_bad_weight_decay_is_an_error_naming_the_value(bad):
    with pytest.raises(WdstudyError, match=r"weight_decay=.*(finite|number)"):
        L2Regularization(bad)
    with pytest.raises(WdstudyError, match="weight_decay"):
        DecoupledWeightDecay(bad)


def test_refuses_an_optimizer_that_regularizes_itself(task, data):
    for cls in (L2Regularization, DecoupledWeightDecay, NoRegularization):
        with pytest.raises(WdstudyError, match=r"optimizer weight_decay=0\.01"):
            fit(task, data, lambda m: torch.optim.Adam(m.parameters(), lr=LR, weight_decay=0.01),
                [cls(LAM) if cls is not NoRegularization else cls()])


def test_make_regularizer_names():
    assert isinstance(make_regularizer("l2", 0.1), L2Regularization)
    assert isinstance(make_regularizer("decoupled", 0.1), DecoupledWeightDecay)
    assert isinstance(make_regularizer("none"), NoRegularization)
    with pytest.raises(WdstudyError, match="regularizer='l1'"):
        make_regularizer("l1", 0.1)
    with pytest.raises(WdstudyError, match="none"):
        make_regularizer("none", 0.1)


def test_history_records_weight_norm_per_epoch(task, data):
    reg = DecoupledWeightDecay(1.0)
    fit(task, data, adam(0.0), [reg])
    assert [row["epoch"] for row in reg.history] == list(range(EPOCHS))
    norms = [row["weight_norm"] for row in reg.history]
    assert norms[-1] < norms[0]  # strong decay shrinks the weights
