"""The mechanics of a run (wdstudy.mechanics): formulas against hand computation and simulation,
the callback against an independent computation from saved weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from wdstudy.mechanics import (
    Mechanics,
    angle,
    equilibrium_angular_update,
    equilibrium_norm,
    integrated_shrink,
    scale_invariant_names,
    timescale,
)
from wdstudy.regularizers import make_regularizer
from wdstudy.train import cosine_factor, make_trainer

# -- formulas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_integrated_shrink_and_timescale_by_hand(schedule):
    lr, wd, T, per_epoch = 0.02, 0.3, 40, 8
    lrs = [lr * (1.0 if schedule == "constant" else cosine_factor(t, T)) for t in range(T)]
    # Σ_{t<T} cos(πt/T) = 1, so the cosine's mean multiplier over T steps is (T + 1) / (2T)
    multipliers = T if schedule == "constant" else (T + 1) / 2
    assert integrated_shrink(lrs, "decoupled", wd) == pytest.approx(lr * wd * multipliers, rel=1e-12)
    assert integrated_shrink(lrs, "independent", wd, lr0=lr) == pytest.approx(wd * multipliers, rel=1e-12)
    assert integrated_shrink(lrs, "l2", wd) is None and integrated_shrink(lrs, "none", 0.0) is None
    ts = timescale("decoupled", lr, wd, per_epoch)
    assert ts["tau_iter"] == pytest.approx(1 / 0.006) and ts["tau_epoch"] == pytest.approx(1 / 0.006 / 8)
    assert timescale("independent", lr, wd, per_epoch)["tau_iter"] == pytest.approx(1 / 0.3)
    assert timescale("l2", lr, wd, per_epoch) == {"tau_iter": None, "tau_epoch": None}


def test_equilibrium_formulas_name_their_cases():
    a, _ = equilibrium_angular_update("adam", "decoupled", 1e-3, 0.1, beta1=0.9)
    assert a == pytest.approx(math.sqrt(2 * 1e-4 * 0.1 / 1.9))
    s, _ = equilibrium_angular_update("sgd", "l2", 0.1, 1e-3, momentum=0.9)
    assert s == pytest.approx(math.sqrt(2 * 1e-4 / 1.9))
    none, why = equilibrium_angular_update("adam", "l2", 1e-3, 1e-4)
    assert none is None and "Adam + L2" in why
    assert equilibrium_angular_update("adam", "none", 1e-3, 0.0)[0] is None
    assert equilibrium_norm(1e-3, 0.5, 200) == pytest.approx(math.sqrt(1e-3 * 200 / 1.0))


def test_angle_of_a_known_rotation():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 2, generator=g, dtype=torch.float64))
    e1, e2 = q[:, 0], q[:, 1]
    for theta in (3e-6, 1e-3, 0.4, 2.5):
        a = (3.0 * e1).float()
        b = (0.7 * (math.cos(theta) * e1 + math.sin(theta) * e2)).float()
        assert float(angle(a, b)) == pytest.approx(theta, rel=2e-3)
    rows_a = torch.stack([e1, e1, e2]).float()
    rows_b = torch.stack([e1, math.cos(0.1) * e1 + math.sin(0.1) * e2, -e2]).float()
    assert angle(rows_a, rows_b, dim=1).tolist() == pytest.approx([0.0, 0.1, math.pi], abs=2e-4)


def test_scale_invariance_detected_and_marked():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8, bias=False),
                        nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    extra = nn.Linear(3, 3)
    extra.weight.scale_invariant = True
    model = nn.ModuleDict({"net": net, "extra": extra})
    # with bias, Linear -> LayerNorm is not invariant (the bias is not scaled); Linear -> BN is
    assert scale_invariant_names(model) == {"net.0.weight", "net.3.weight", "extra.weight"}
    # and the detection is true: the output does not change when a detected weight is scaled
    net.train()
    x = torch.randn(16, 4)
    before = net(x)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
        net[3].weight.mul_(4.0)
    assert torch.allclose(net(x), before, atol=1e-3)  # up to the norms' eps


# -- rotational equilibrium, simulated with torch.optim.AdamW (independent of the callback) ------


def _normalized_problem(seed: int, d: int = 16, h: int = 8, n: int = 16, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(h, classes, generator=g)

    def loss_of(w: torch.Tensor) -> torch.Tensor:  # scale-invariant in w: a batch norm follows x @ w.T
        x = torch.randn(n, d, generator=g)
        y = torch.randint(0, classes, (n,), generator=g)
        z = x @ w.T
        z = (z - z.mean(0)) / z.std(0)
        return nn.functional.cross_entropy(z @ head, y)

    return loss_of, g


@pytest.mark.integration
def test_adamw_reaches_the_predicted_equilibrium():
    torch.set_num_threads(1)
    lr, wd, beta1, steps = 1e-2, 0.1, 0.9, 1500  # τ = 1/(ηλ) = 1000 steps
    loss_of, g = _normalized_problem(1)
    w0 = torch.randn(8, 16, generator=g)
    eq = equilibrium_norm(lr, wd, w0.numel())
    w = nn.Parameter(w0 * eq / w0.norm())  # start at the predicted norm: the angle settles in ~1/(1-β1) steps
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=wd, betas=(beta1, 0.999))
    angles = []
    for _ in range(steps):
        opt.zero_grad()
        loss_of(w).backward()
        prev = w.detach().double().clone()
        opt.step()
        cur = w.detach().double()
        angles.append(math.acos(min(1.0, float((prev * cur).sum() / (prev.norm() * cur.norm())))))
    measured = float(np.mean(angles[steps // 3:]))
    predicted, _ = equilibrium_angular_update("adam", "decoupled", lr, wd, beta1=beta1)
    assert measured == pytest.approx(predicted, rel=0.10)
    assert float(w.detach().norm()) == pytest.approx(eq, rel=0.10)


# -- the callback in a Trainer -------------------------------------------------------------------


class Normalized(LightningModule):
    """A user's LightningModule: Linear (no bias) -> BatchNorm (no affine) -> Linear head, on noise."""

    def __init__(self, lr: float, schedule: str = "constant", zero_grad: bool = False, optimizer: str = "adam"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 4))
        self.lr, self.schedule, self.no_gradient, self.opt_name = lr, schedule, zero_grad, optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        return loss * 0.0 if self.no_gradient else loss

    def configure_optimizers(self):
        opt = (torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.9, 0.999)) if self.opt_name == "adam"
               else torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9))
        if self.schedule == "constant":
            return opt
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader(n: int, seed: int = 0, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=batch, shuffle=True, generator=g)


class SaveWeights(Callback):
    """Saves the watched weights (float64 copies) at the start and after every optimizer step."""

    def __init__(self, names):
        self.names, self.saved, self.lrs = names, [], []

    def _save(self, pl_module):
        params = dict(pl_module.named_parameters())
        self.saved.append({n: params[n].detach().double().clone() for n in self.names})

    def on_train_start(self, trainer, pl_module):
        self._save(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._save(pl_module)


@pytest.mark.parametrize("convention", ["decoupled", "independent"])
def test_zero_gradient_norm_is_the_product_of_the_shrinks(convention):
    lr, wd, epochs = 0.05, 0.4, 3
    module = Normalized(lr, schedule="cosine", zero_grad=True)
    torch.manual_seed(0)
    w0 = {n: p.detach().double().clone() for n, p in module.named_parameters() if p.ndim == 2}
    mech = Mechanics(convention, wd, checkpoints=4)
    saver = SaveWeights(list(w0))
    trainer = make_trainer(epochs, [make_regularizer(convention, wd), mech, saver], accelerator="cpu")
    trainer.fit(module, train_dataloaders=_loader(64))
    steps = trainer.global_step
    assert steps == epochs * 4 and len(saver.lrs) == steps
    factors = [1 - (eta / (lr if convention == "independent" else 1.0)) * wd for eta in saver.lrs]
    shrink = math.prod(factors)
    t = mech.table
    for name, w in w0.items():
        final = [v for s, n, v in zip(t["step"], t["layer"], t["weight_norm"]) if n == name and s == steps]
        assert final == [pytest.approx(float(w.norm()) * shrink, rel=1e-6)]
        assert float(dict(module.named_parameters())[name].detach().double().norm()) == pytest.approx(
            float(w.norm()) * shrink, rel=1e-6)
    summary = mech.summary()
    multiplier = (steps + 1) / 2  # the cosine schedule's Σ s_t over the run
    expected_s = wd * multiplier * (lr if convention == "decoupled" else 1.0)
    assert summary["integrated_shrink"] == pytest.approx(expected_s, rel=1e-9)
    assert summary["steps_per_epoch"] == 4 and summary["run_epochs"] == pytest.approx(epochs)
    tau = 1 / (lr * wd) if convention == "decoupled" else 1 / wd
    assert summary["tau_iter"] == pytest.approx(tau) and summary["tau_epoch"] == pytest.approx(tau / 4)


@pytest.mark.integration
def test_callback_agrees_with_saved_weights_and_reaches_equilibrium():
    torch.set_num_threads(1)
    lr, wd, epochs = 1e-2, 0.1, 2  # 375 steps an epoch of fresh noise (gradients are noise), 750 steps; τ = 1000
    torch.manual_seed(3)
    module = Normalized(lr)
    with torch.no_grad():  # start at the predicted equilibrium norm of the normalized layer
        w = module.net[0].weight
        w.mul_(equilibrium_norm(lr, wd, w.numel()) / w.norm())
    names = ["net.0.weight", "net.2.weight"]
    mech = Mechanics("decoupled", wd, checkpoints=5, every=1)  # every step sampled
    saver = SaveWeights(names)
    trainer = make_trainer(epochs, [make_regularizer("decoupled", wd), mech, saver], accelerator="cpu")
    trainer.fit(module, train_dataloaders=_loader(6000))
    t = mech.table
    steps = trainer.global_step
    assert sorted(set(t["step"])) == [0, 150, 300, 450, 600, 750] and steps == 750
    assert t["scale_invariant"][:2] == [True, False]

    def independent_angle(a, b):
        return math.acos(max(-1.0, min(1.0, float((a * b).sum() / (a.norm() * b.norm())))))

    for i, (step, name) in enumerate(zip(t["step"], t["layer"])):
        w = saver.saved[step][name]
        assert t["weight_norm"][i] == pytest.approx(float(w.norm()), rel=1e-9)
        if step == 0:
            assert t["angular_update"][i] is None
            continue
        first = step - 150
        angles = [independent_angle(saver.saved[s][name], saver.saved[s + 1][name]) for s in range(first, step)]
        assert t["angular_samples"][i] == 150
        assert t["angular_update"][i] == pytest.approx(np.mean(angles), rel=1e-3)
        rows = [[independent_angle(saver.saved[s][name][r], saver.saved[s + 1][name][r]) for s in range(first, step)]
                for r in range(w.shape[0])]
        per_neuron = np.mean(rows, axis=1)
        assert t["neuron_spread"][i] == pytest.approx(np.std(per_neuron, ddof=1) / np.mean(per_neuron), rel=1e-2)
        pred = np.mean([equilibrium_angular_update("adam", "decoupled", eta, wd)[0]
                        for eta in saver.lrs[first:step]])
        assert t["predicted_angular_update"][i] == pytest.approx(pred, rel=1e-9)
        if name == "net.0.weight":
            assert t["effective_lr"][i] == pytest.approx(lr / float(w.norm()) ** 2, rel=1e-9)
        else:
            assert t["effective_lr"][i] is None
    # the normalized layer sits at its equilibrium (the head is not scale-invariant and need not)
    layer = [i for i, (s, n) in enumerate(zip(t["step"], t["layer"])) if n == "net.0.weight" and s > 300]
    ratio = np.mean([t["angular_update"][i] / t["predicted_angular_update"][i] for i in layer])
    assert ratio == pytest.approx(1.0, abs=0.10)
    s = mech.summary()
    assert s["equilibrium_ratio_min"] <= ratio * 1.05 and s["angular_imbalance"] >= 1.0
    assert 0 <= s["mechanics_overhead"] < 1


def test_adam_l2_records_its_per_weight_shrink_instead_of_a_prediction():
    lr, wd = 1e-2, 1e-3
    torch.manual_seed(0)
    module = Normalized(lr)
    mech = Mechanics("l2", wd, checkpoints=2)
    trainer = make_trainer(2, [make_regularizer("l2", wd), mech], accelerator="cpu")
    trainer.fit(module, train_dataloaders=_loader(64))
    t = mech.table
    last = [i for i, s in enumerate(t["step"]) if s == trainer.global_step]
    assert all(t["predicted_angular_update"][i] is None for i in last)
    opt = trainer.optimizers[0]
    params = [module.net[0].weight, module.net[2].weight]
    v = torch.cat([(opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** float(opt.state[p]["step"]))).reshape(-1)
                   for p in params]).double().numpy()
    shrink = lr * wd / (np.sqrt(v) + 1e-8)
    i = last[0]
    assert [t["shrink_p10"][i], t["shrink_median"][i], t["shrink_p90"][i]] == pytest.approx(
        np.quantile(shrink, [0.1, 0.5, 0.9]), rel=1e-4)
    assert t["shrink_p90"][i] > 1.5 * t["shrink_p10"][i]  # uneven: the point of the comparison
    summary = mech.summary()
    assert summary["tau_iter"] is None and summary["integrated_shrink"] is None
    assert summary["equilibrium_ratio"] is None


def test_gradient_accumulation_counts_optimizer_steps_not_batches():
    lr, wd = 0.05, 0.2
    torch.manual_seed(0)
    module = Normalized(lr)
    mech = Mechanics("decoupled", wd, checkpoints=3, every=1)
    saver = SaveWeights(["net.0.weight"])
    trainer = make_trainer(2, [make_regularizer("decoupled", wd), mech, saver], accelerator="cpu",
                           accumulate_grad_batches=2)
    trainer.fit(module, train_dataloaders=_loader(128))  # 8 batches an epoch: 4 optimizer steps
    assert trainer.global_step == 8 and len(saver.lrs) == 8
    s = mech.summary()
    assert s["steps_per_epoch"] == 4 and s["run_epochs"] == pytest.approx(2)
    assert s["integrated_shrink"] == pytest.approx(wd * sum(saver.lrs))
    assert sorted(set(mech.table["step"])) == [0, 3, 5, 8]
    assert sum(n for st, n in zip(mech.table["step"], mech.table["angular_samples"]) if st > 0) == 8 * 2
