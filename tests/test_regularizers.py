"""Exactness of the regularizer callbacks against PyTorch's own optimizers.

Every trajectory runs through a real Lightning Trainer on MNIST-1D (640 training
examples, batch 32: 20 steps per epoch, 3 epochs = 60 optimizer steps). The
reference runs put the regularization inside PyTorch's optimizer instead
(``Adam(weight_decay=...)``, ``AdamW``, ``SGD(weight_decay=...)``) or inside the loss
(L1 and L2 penalties differentiated by autograd), with the same decay / no-decay
parameter groups that the callbacks use. The mixed-precision tests run a small
module of their own under Lightning's ``MixedPrecision("16-mixed", "cpu")`` plugin
(fp16 autocast and a real ``GradScaler`` on the CPU), with inf gradients forced on
chosen steps.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, seed_everything
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from wdstudy.errors import WdstudyError
from wdstudy.regularizers import (
    REGULARIZERS,
    DecoupledL1,
    DecoupledWeightDecay,
    IndependentWeightDecay,
    L1Regularization,
    L2Regularization,
    NoRegularization,
    make_regularizer,
    split_parameters,
)
from wdstudy.tasks import task_config
from wdstudy.train import OptimizerConfig, SupervisedModule, make_trainer

LAM = 0.05
LR = 3e-3
EPOCHS = 3
TOL = 1e-6
#: Where these comparisons train: the CPU, or CUDA when the GPU acceptance run sets WDSTUDY_TEST_DEVICE=cuda.
DEVICE = os.environ.get("WDSTUDY_TEST_DEVICE", "cpu")
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"


@pytest.fixture(scope="module")
def task():
    # BatchNorm gives the CNN normalization parameters, which must not be regularized.
    return task_config("cnn-mnist1d", width=8, layers=2, batch_norm=True, batch_size=32, max_train=640, epochs=EPOCHS)


@pytest.fixture(scope="module")
def data(task):
    return task.load_data()


class RefClassifier(SupervisedModule):
    """The same module, with an optimizer built by a test-supplied factory."""

    opt_factory = None
    penalty_in_loss = 0.0
    l1_in_loss = 0.0

    def make_optimizer(self):
        return self.opt_factory(self.model)

    def objective(self, loss):
        if self.penalty_in_loss:
            decay, _ = split_parameters(self.model)
            loss = loss + 0.5 * self.penalty_in_loss * sum(p.square().sum() for p in decay)
        if self.l1_in_loss:
            decay, _ = split_parameters(self.model)
            loss = loss + self.l1_in_loss * sum(p.abs().sum() for p in decay)
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


def fit(task, data, opt_factory, callbacks=(), schedule="cosine", clip=None, accumulate=1, penalty_in_loss=0.0,
        l1_in_loss=0.0, lr=LR):
    """Train through a real Trainer: the production module (manual optimization), or with
    ``accumulate`` > 1 Lightning's automatic optimization with gradient accumulation.
    ``lr`` only sets the module's ``lr``; the optimizer's comes from ``opt_factory``."""
    seed_everything(0, verbose=False)
    cls = AutoRefClassifier if accumulate > 1 else RefClassifier
    module = cls(
        task.build_model(), data, optimizer=OptimizerConfig(name="adam"), lr=lr, schedule=schedule,
        batch_size=task.batch_size, seed=0, grad_clip=clip,
    )
    module.opt_factory = opt_factory
    module.penalty_in_loss = penalty_in_loss
    module.l1_in_loss = l1_in_loss
    extra = {"accumulate_grad_batches": accumulate} if accumulate > 1 else {}
    trainer = make_trainer(EPOCHS, list(callbacks), accelerator=ACCELERATOR, **extra)
    trainer.fit(module)
    assert trainer.global_step >= 50 // accumulate
    return module.model


def max_diff(a, b):
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


adam = lambda wd, lr=LR: (lambda m: torch.optim.Adam(groups(m, wd), lr=lr))  # noqa: E731
adamw = lambda wd, lr=LR: (lambda m: torch.optim.AdamW(groups(m, wd), lr=lr))  # noqa: E731
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


@pytest.mark.integration
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


def soft_threshold(w, t):
    """The closed form of decoupled L1: sign(w) * max(|w| - t, 0)."""
    return torch.sign(w) * torch.clamp(w.abs() - t, min=0)


def test_excluded_parameters_untouched_and_one_step_by_hand(task):
    """Each arm, applied once outside a Trainer (SGD, lr 0.1, λ 0.5), against its formula."""
    seed_everything(0, verbose=False)
    model = task.build_model()
    decay, no_decay = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert any("bias" in names[id(p)] for p in no_decay) and len(decay) == 3
    decay[0].data[0].zero_()  # sign(0) = 0: L1 leaves a zero weight's gradient alone
    lr, lam = 0.1, 0.5
    expected = {  # (weight, gradient) after the regularizer, from (w0, g0)
        L2Regularization: lambda w0, g0: (w0, g0 + lam * w0),
        L1Regularization: lambda w0, g0: (w0, g0 + lam * torch.sign(w0)),
        DecoupledWeightDecay: lambda w0, g0: (w0 * (1 - lr * lam), g0),
        IndependentWeightDecay: lambda w0, g0: (w0 * (1 - lam), g0),  # no schedule: s_t = 1
        DecoupledL1: lambda w0, g0: (soft_threshold(w0, lr * lam), g0),
    }
    assert set(expected) | {NoRegularization} == set(REGULARIZERS.values())
    for cls, formula in expected.items():
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        before = {id(p): (p.detach().clone(), p.grad.clone()) for p in model.parameters()}
        reg = cls(lam)
        reg.attach(model, [opt])
        reg.apply(opt)
        for p in no_decay:
            assert torch.equal(p, before[id(p)][0]) and torch.equal(p.grad, before[id(p)][1])
        for p in decay:
            w, g = formula(*before[id(p)])
            assert torch.allclose(p, w, rtol=1e-6, atol=0) and torch.equal(p.grad, g), cls
            if cls in (L1Regularization, DecoupledL1):
                assert torch.equal(p, w), cls  # bit for bit
        if cls is DecoupledL1:  # and then the optimizer step, by hand
            n_zero = sum(int((w0.abs() <= lr * lam).sum()) for w0, _ in (before[id(p)] for p in decay))
            assert n_zero > 0 and reg.zero_fraction() == n_zero / sum(p.numel() for p in decay)
            opt.step()
            for p in decay:
                w0, g0 = before[id(p)]
                assert torch.allclose(p, soft_threshold(w0, lr * lam) - lr * g0, rtol=0, atol=1e-7)
        for p in model.parameters():
            p.data.copy_(before[id(p)][0])


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
    l1 = L1Regularization(0.2)
    l1.attach(model, [])
    l1_norm = sum(float(p.detach().double().abs().sum()) for p in decay)
    assert math.isclose(l1.penalty(), 0.2 * l1_norm, rel_tol=1e-12)
    for cls in (IndependentWeightDecay, DecoupledL1, NoRegularization):
        reg = cls(0.2) if cls is not NoRegularization else cls()
        reg.attach(model, [])
        assert reg.penalty() is None and math.isclose(reg.weight_norm(), math.sqrt(sq), rel_tol=1e-12)
    assert l1.zero_fraction() == 0.0
    with torch.no_grad():
        decay[0].view(-1)[:10] = 0.0
        decay[1].view(-1)[:5] = -0.0
    assert l1.zero_fraction() == 15 / sum(p.numel() for p in decay)
    assert NoRegularization().zero_fraction() == 0.0  # not attached: no parameters


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), "abc"])
def test_bad_weight_decay_is_an_error_naming_the_value(bad):
    for cls in REGULARIZERS.values():
        with pytest.raises(WdstudyError, match=r"weight_decay=.*(finite|number)"):
            cls(bad)


def test_refuses_an_optimizer_that_regularizes_itself(task, data):
    for cls in REGULARIZERS.values():
        with pytest.raises(WdstudyError, match=r"optimizer weight_decay=0\.01"):
            fit(task, data, lambda m: torch.optim.Adam(m.parameters(), lr=LR, weight_decay=0.01),
                [cls(LAM) if cls is not NoRegularization else cls()])


def test_make_regularizer_names():
    assert isinstance(make_regularizer("l2", 0.1), L2Regularization)
    assert isinstance(make_regularizer("decoupled", 0.1), DecoupledWeightDecay)
    assert isinstance(make_regularizer("none"), NoRegularization)
    assert isinstance(make_regularizer("independent", 0.1), IndependentWeightDecay)
    assert isinstance(make_regularizer("l1", 0.1), L1Regularization)
    assert isinstance(make_regularizer("l1-decoupled", 0.1), DecoupledL1)
    assert list(REGULARIZERS) == ["l2", "decoupled", "none", "independent", "l1", "l1-decoupled"]
    with pytest.raises(WdstudyError, match="regularizer='l3'"):
        make_regularizer("l3", 0.1)
    with pytest.raises(WdstudyError, match="none"):
        make_regularizer("none", 0.1)


def test_history_records_weight_norm_per_epoch(task, data):
    reg = DecoupledWeightDecay(1.0)
    fit(task, data, adam(0.0), [reg])
    assert [row["epoch"] for row in reg.history] == list(range(EPOCHS))
    norms = [row["weight_norm"] for row in reg.history]
    assert norms[-1] < norms[0]  # strong decay shrinks the weights


# -- the new arms: independent weight decay, L1, decoupled L1 ------------------------


class Snapshot(Callback):
    """Records the regularized weights (and the first group's lr) in ``on_before_optimizer_step``.

    Placed before and after a regularizer in the callback list, two snapshots see the
    weights just before and just after the regularizer acts, at every step.
    """

    def __init__(self, reg):
        self.reg, self.weights, self.lrs = reg, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.weights.append([p.detach().clone() for p in self.reg.parameters])
        self.lrs.append(optimizer.param_groups[0]["lr"])


def shrink_factors(reg, task, data, opt_factory, schedule, lr):
    """Per step, the factor f with w_after = f * w_before (least squares over all weights, float64)."""
    before, after = Snapshot(reg), Snapshot(reg)
    fit(task, data, opt_factory, [before, reg, after], schedule=schedule, lr=lr)
    factors = []
    for wb, wa in zip(before.weights, after.weights):
        b = torch.cat([w.double().flatten() for w in wb])
        a = torch.cat([w.double().flatten() for w in wa])
        factors.append(float(a @ b / (b @ b)))
    return factors, before, after


LAM_IND = 2e-3  # independent decay: shrink by 1 - 2e-3 per step at the start of the schedule


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_independent_with_adam_equals_adamw_with_decay_over_initial_lr(task, data, schedule):
    """AdamW shrinks by lr_t * wd = lr_t * λ / lr_0 = s_t * λ."""
    ours = fit(task, data, adam(0.0), [IndependentWeightDecay(LAM_IND)], schedule=schedule)
    ref = fit(task, data, adamw(LAM_IND / LR), schedule=schedule)
    plain = fit(task, data, adam(0.0), schedule=schedule)
    assert max_diff(ours, ref) <= TOL
    assert max_diff(ours, plain) > 1e-4


@pytest.mark.integration
def test_independent_shrink_does_not_scale_with_the_base_lr(task, data):
    """Per step, w_after / w_before = 1 - s_t * λ for any base lr; decoupled decay's scales with it."""
    total = EPOCHS * 20
    cosine = [0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    runs = {base: shrink_factors(IndependentWeightDecay(LAM_IND), task, data, adam(0.0, base), "cosine", base)
            for base in (LR, 10 * LR)}
    (small, before, _), (large, _, _) = runs[LR], runs[10 * LR]
    assert len(small) == len(large) == total
    assert [lr / LR for lr in before.lrs] == pytest.approx(cosine, abs=1e-12)
    assert small == pytest.approx([1 - LAM_IND * s for s in cosine], abs=1e-7)
    assert large == pytest.approx(small, abs=1e-7)
    dec_small = shrink_factors(DecoupledWeightDecay(1.0), task, data, adam(0.0, LR), "cosine", LR)[0]
    dec_large = shrink_factors(DecoupledWeightDecay(1.0), task, data, adam(0.0, 10 * LR), "cosine", 10 * LR)[0]
    assert 1 - dec_large[0] == pytest.approx(10 * (1 - dec_small[0]), rel=1e-4)

    # with a constant schedule: "multiply every weight by 1 - λ" before each step, exactly
    lam = 0.02
    for base in (LR, 10 * LR):
        _, before, after = shrink_factors(IndependentWeightDecay(lam), task, data, adam(0.0, base), "constant", base)
        for wb, wa in zip(before.weights, after.weights):
            assert all(torch.equal(a, b * (1 - lam)) for a, b in zip(wa, wb))


def test_independent_without_a_scheduler_uses_the_lr_at_train_start(task):
    model = task.build_model()
    opt = torch.optim.SGD(groups(model, 0.0), lr=0.5)
    reg = IndependentWeightDecay(0.1)
    reg.attach(model, [opt])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.25  # changed by hand after the start: s_t = 0.5
    w0 = [p.detach().clone() for p in reg.parameters]
    reg.apply(opt)
    assert all(torch.equal(p, w * (1 - 0.5 * 0.1)) for p, w in zip(reg.parameters, w0))
    opt.param_groups[0]["lr"] = 0.0
    with pytest.raises(WdstudyError, match="lr=0.0"):
        reg.attach(model, [opt])


LAM_L1 = 1e-2


@pytest.mark.parametrize("clip", [None, 0.05])
def test_l1_equals_l1_penalty_in_the_loss_through_autograd(task, data, clip):
    """g + λ·sign(w) is what autograd makes of λ·‖w‖₁ in the loss, also before clipping."""
    ours = fit(task, data, adam(0.0), [L1Regularization(LAM_L1)], clip=clip)
    as_loss = fit(task, data, adam(0.0), [NoRegularization()], l1_in_loss=LAM_L1, clip=clip)
    plain = fit(task, data, adam(0.0), clip=clip)
    if clip is None:
        assert max_diff(ours, as_loss) == 0.0  # bit for bit
    else:  # the clipping norm is summed over differently-rounded gradients
        assert max_diff(ours, as_loss) <= TOL
    assert max_diff(ours, plain) > 1e-4


def test_decoupled_l1_is_soft_thresholding_at_the_current_lr(task, data):
    """At every step of a cosine schedule: w_after = sign(w)·max(|w| − lr_t·λ, 0), bit for bit."""
    lam = 0.5
    reg = DecoupledL1(lam)
    before, after = Snapshot(reg), Snapshot(reg)
    fit(task, data, adam(0.0), [before, reg, after])
    assert len(before.weights) == EPOCHS * 20 and len(set(before.lrs)) > 50
    for wb, wa, lr in zip(before.weights, after.weights, before.lrs):
        assert all(torch.equal(a, soft_threshold(b, lr * lam)) for a, b in zip(wa, wb))


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_every_arm_records_weight_norm_and_penalty_per_epoch(task, data, name):
    lam = {"l2": LAM, "decoupled": 1.0, "independent": 10 * LAM_IND, "l1": LAM_L1, "l1-decoupled": 1.0}
    reg = make_regularizer(name, lam.get(name, 0.0))
    fit(task, data, adam(0.0), [reg])
    assert [row["epoch"] for row in reg.history] == list(range(EPOCHS))
    norms = [row["weight_norm"] for row in reg.history]
    assert all(math.isfinite(n) and n > 0 for n in norms)
    assert norms[-1] == reg.weight_norm() and reg.history[-1]["penalty"] == reg.penalty()
    assert (reg.penalty() is not None) == (name in ("l2", "l1"))
    if name in ("decoupled", "independent", "l1-decoupled"):
        assert norms[-1] < norms[0]  # strong decay shrinks the weights


def count_zeros(params):
    return sum(int((p == 0).sum()) for p in params)


@pytest.mark.integration
def test_decoupled_l1_makes_exact_zeros_and_the_other_arms_none(task, data):
    """Soft thresholding zeroes every weight within lr_t·λ of zero. The optimizer step that
    follows it adds its update to those zeros: with Adam (whose momentum makes the update
    nonzero) no exact zero survives the step, with plain SGD those whose gradient is exactly
    zero do. The shrinking decays and L2 never produce an exact zero."""
    reg = DecoupledL1(1.0)
    after = Snapshot(reg)
    fit(task, data, adam(0.0), [reg, after])
    assert all(count_zeros(w) > 0 for w in after.weights[-10:])  # right after the threshold
    assert reg.zero_fraction() == 0.0  # after Adam's last step
    reg = DecoupledL1(1.0)
    fit(task, data, lambda m: torch.optim.SGD(groups(m, 0.0), lr=10 * LR), [reg])
    assert 0.1 < reg.zero_fraction() < 1 and reg.zero_fraction() == count_zeros(reg.parameters) / sum(
        p.numel() for p in reg.parameters)
    for other in (L2Regularization(LAM), DecoupledWeightDecay(1.0), IndependentWeightDecay(10 * LAM_IND)):
        after = Snapshot(other)
        fit(task, data, adam(0.0), [other, after])
        assert other.zero_fraction() == 0.0 and all(count_zeros(w) == 0 for w in after.weights)


# -- mixed precision: Lightning's MixedPrecision plugin with a GradScaler, on the CPU -------


class ProxAdam(torch.optim.Adam):
    """Reference for decoupled L1 under a GradScaler: soft-thresholds its first group inside
    ``step()``, so that ``GradScaler.step`` skips it with the update, as it does AdamW's decay."""

    def __init__(self, params, lr, l1):
        super().__init__(params, lr=lr)
        self.l1 = l1

    @torch.no_grad()
    def step(self, closure=None):
        group = self.param_groups[0]
        for p in group["params"]:
            if p.grad is not None:
                p.copy_(soft_threshold(p, group["lr"] * self.l1))
        return super().step(closure)


class AmpNet(LightningModule):
    """A small MLP on fixed random data: 8 batches of 32 per epoch, 3 epochs, cosine schedule.

    On the steps in ``inf_loss`` the loss is multiplied by inf (every gradient inf/NaN);
    on those in ``inf_bias`` one entry of a bias gradient (a parameter no regularizer
    touches) is set to inf after backward. The scaler must skip both kinds.
    """

    steps = 24
    inf_loss = {3, 11}
    inf_bias = {6, 17}

    def __init__(self, opt_factory, manual, l1_in_loss=0.0):
        super().__init__()
        seed_everything(0, verbose=False)
        self.net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(256, 20, generator=gen)
        self.y = torch.randint(0, 5, (256,), generator=gen)
        self.opt_factory, self.l1_in_loss = opt_factory, l1_in_loss
        self.automatic_optimization = not manual
        self.calls = 0

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=32)

    def configure_optimizers(self):
        opt = self.opt_factory(self.net)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / self.steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def objective(self, batch):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        assert self.net(x).dtype == torch.float16  # autocast is on
        if self.l1_in_loss:
            decay, _ = split_parameters(self.net)
            loss = loss + self.l1_in_loss * sum(p.abs().sum() for p in decay)
        return loss * float("inf") if self.calls in self.inf_loss else loss

    def on_after_backward(self):
        if self.calls in self.inf_bias:
            self.net[0].bias.grad[0] = float("inf")

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self.objective(batch)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.objective(batch))
        opt.step()
        self.lr_schedulers().step()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.calls += 1


class StepRecorder(Callback):
    """All weights before and after each training batch."""

    def __init__(self):
        self.changed = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self.start, pl_module.parameters())))


def amp_fit(opt_factory, callbacks=(), manual=True, l1_in_loss=0.0):
    module = AmpNet(opt_factory, manual, l1_in_loss)
    recorder = StepRecorder()
    trainer = make_trainer(3, [*callbacks, recorder], accelerator=ACCELERATOR,
                           plugins=[MixedPrecision("16-mixed", DEVICE)], limit_val_batches=0)
    assert trainer.precision_plugin.scaler is not None
    trainer.fit(module)
    skipped = AmpNet.inf_loss | AmpNet.inf_bias
    assert trainer.global_step == AmpNet.steps
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**16 / 2 ** len(skipped)  # halved on each skip
    assert [i for i, c in enumerate(recorder.changed) if not c] == sorted(skipped)  # skips changed no weight
    return module.net


AMP_LR = 1e-2
amp_adam = lambda wd: (lambda m: torch.optim.Adam(groups(m, wd), lr=AMP_LR))  # noqa: E731
amp_adamw = lambda wd: (lambda m: torch.optim.AdamW(groups(m, wd), lr=AMP_LR))  # noqa: E731
AMP_ARMS = {  # name: (regularizer, reference run's optimizer factory and its l1_in_loss)
    "decoupled": (DecoupledWeightDecay(1.0), amp_adamw(1.0), 0.0),
    "independent": (IndependentWeightDecay(1e-2), amp_adamw(1e-2 / AMP_LR), 0.0),
    "l1-decoupled": (DecoupledL1(0.5), lambda m: ProxAdam(groups(m, 0.0), lr=AMP_LR, l1=0.5), 0.0),
    "l2": (L2Regularization(0.1), amp_adam(0.1), 0.0),
    "l1": (L1Regularization(1e-2), amp_adam(0.0), 1e-2),
}


@pytest.mark.parametrize("manual", [True, False], ids=["manual", "automatic"])
@pytest.mark.parametrize("name", list(AMP_ARMS))
def test_under_a_grad_scaler_regularizers_skip_the_steps_the_scaler_skips(name, manual):
    """fp16 autocast + GradScaler through Lightning's MixedPrecision plugin, with inf
    gradients forced on 4 of 24 steps: the decays match AdamW (or a soft-thresholding
    Adam) under the same scaler, skipping exactly its skipped steps; the penalties act
    on unscaled gradients, matching Adam(weight_decay) or the penalty in the loss."""
    reg, ref_factory, l1_in_loss = AMP_ARMS[name]
    ours = amp_fit(amp_adam(0.0), [reg], manual)
    ref = amp_fit(ref_factory, [], manual, l1_in_loss=l1_in_loss)
    plain = amp_fit(amp_adam(0.0), [], manual)
    assert max_diff(ours, ref) <= TOL
    assert max_diff(ours, plain) > 1e-4


def test_apply_refuses_gradients_the_scaler_has_not_unscaled():
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    reg = DecoupledWeightDecay(0.1)
    reg.attach(model, [opt])
    scaler.scale(model(torch.randn(2, 4)).sum()).backward()
    with pytest.raises(WdstudyError, match="unscaled"):
        reg.apply(opt, scaler)
    w0 = model.weight.detach().clone()
    scaler.unscale_(opt)
    reg.apply(opt, scaler)
    assert torch.equal(model.weight, w0 * (1 - 0.1 * 0.1))
    model.weight.grad[0, 0] = float("nan")
    opt2 = torch.optim.Adam(model.parameters(), lr=0.1)
    reg.attach(model, [opt2])
    scaler2 = torch.amp.GradScaler("cpu")
    scaler2.scale(torch.ones(()))  # (creates the scale)
    scaler2.unscale_(opt2)
    w1 = model.weight.detach().clone()
    reg.apply(opt2, scaler2)  # the scaler found the NaN: nothing changes
    assert torch.equal(model.weight, w1)
    reg.apply(opt2, torch.amp.GradScaler("cpu", enabled=False))  # a disabled scaler is no scaler
    assert torch.equal(model.weight, w1 * (1 - 0.1 * 0.1))


@pytest.mark.parametrize("name", ["decoupled", "independent", "l1-decoupled", "l2", "l1"])
def test_under_a_grad_scaler_no_regularizer_reads_a_tensor_on_the_host(name, monkeypatch):
    """Whether the scaler will skip the step is decided on the device: reading it on the host
    (``bool``, ``item``) would make every mixed-precision step wait for the GPU. The weights come
    out as without a scaler on a kept step, and unchanged on a skipped one."""
    from wdstudy.regularizers import make_regularizer

    def forbidden(self, *args):
        raise AssertionError("a tensor was read on the host")

    for found_nan in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        reg = make_regularizer(name, 0.05)
        reg.attach(model, [opt])
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(model(torch.randn(2, 4)).sum()).backward()
        if found_nan:
            model.weight.grad[0, 0] = float("nan")
        scaler.unscale_(opt)
        w0, g0 = model.weight.detach().clone(), model.weight.grad.detach().clone()
        with monkeypatch.context() as m:
            for attr in ("__bool__", "item", "tolist", "__float__"):
                m.setattr(torch.Tensor, attr, forbidden)
            reg.apply(opt, scaler)
        if found_nan and reg.changes_weights:
            assert torch.equal(model.weight, w0)
        elif reg.changes_weights:
            expect = model.weight.detach().clone()
            model.weight.data.copy_(w0)
            reg.apply(opt)  # the plain path, no scaler
            assert torch.equal(model.weight, expect)
        else:  # a penalty adds to the gradient either way: the scaler then skips the step if it must
            assert not torch.equal(model.weight.grad, g0) or found_nan


def test_each_arm_of_the_registry_has_one_callback_that_acts_as_its_kind_says():
    from wdstudy.arms import ARMS, NAMES, PAIRS
    from wdstudy.regularizers import REGULARIZERS, Regularizer
    from wdstudy.report.style import ARMS as REPORT_ORDER
    from wdstudy.spec import REGULARIZER_NAMES

    assert set(REGULARIZERS) == set(NAMES) and NAMES == REGULARIZER_NAMES == REPORT_ORDER
    with pytest.raises(TypeError):
        Regularizer()  # abstract: an arm is one of its subclasses
    model = nn.Linear(3, 2)
    for arm in ARMS:
        reg = REGULARIZERS[arm.name](0.0 if arm.kind == "none" else 0.1)
        reg.attach(model, [])
        assert reg.name == arm.name
        assert reg.changes_weights == (arm.kind != "penalty"), arm.name
        assert (reg.penalty() is not None) == (arm.kind == "penalty"), arm.name
    # every regularized arm is compared with the baseline; decays with the penalty of their norm
    assert {(a.name, "none") for a in ARMS if a.kind != "none"} <= set(PAIRS)
    assert {("decoupled", "l2"), ("l1-decoupled", "l1"), ("independent", "decoupled")} <= set(PAIRS)
