"""The experiments: one function per claim, each running its small experiment and returning a
:class:`~.setup.Claim` with the measured numbers, a sentence saying what was measured, and the
data of its figure panel (no verdict: :mod:`.rules` gives it from the numbers).

Most take the setup and the MNIST-1D data shared by every run; :func:`claim_norm` and
:func:`claim_gap` read the λ sweeps (:func:`~.runs.sweeps`) instead.
"""

from __future__ import annotations

import math

import numpy as np

from .runs import SHORT_STEPS, distance, instruments, rel_diff, run, short_setup
from .setup import CURVE_TASK, SGD, Claim, Setup


def claim_sgd(setup: Setup, data) -> Claim:
    short, sdata = short_setup(setup)
    a, ca = run(short, SGD, "l2", 0.05, 0.01, data=sdata)
    b, cb = run(short, SGD, "decoupled", 0.05, 0.01, data=sdata)
    rel = rel_diff(ca.weights, cb.weights)
    nums = {"max_rel_diff": rel, "norm_l2": a.metrics["weight_norm"], "norm_decoupled": b.metrics["weight_norm"]}
    text = (f"after {SHORT_STEPS} steps the largest relative difference of the weights is {rel:.1e} "
            f"(weight norms {a.metrics['weight_norm']:.7f} and {b.metrics['weight_norm']:.7f})")
    if setup.epochs > short.epochs:
        _, la = run(setup, SGD, "l2", 0.05, 0.01, data=data)
        _, lb = run(setup, SGD, "decoupled", 0.05, 0.01, data=data)
        nums["max_rel_diff_long"] = rel_diff(la.weights, lb.weights)
        text += (f"; after {setup.epochs} epochs rounding differences have grown to {nums['max_rel_diff_long']:.1e} "
                 "(float32 trajectories drift apart; the update is the same)")
    return Claim("sgd_equal", "Under plain SGD (no momentum), L2 regularization with λ and decoupled weight decay "
                 "with λ (PyTorch's convention) are the same update.",
                 f"MLP on MNIST-1D, SGD without momentum, lr 0.05, cosine schedule, λ = 0.01, seed 0; weights "
                 f"compared after {SHORT_STEPS} steps (and after {setup.epochs} epochs on the whole training split)",
                 nums, text)


def claim_momentum_adam(setup: Setup, data) -> Claim:
    nums, parts = {}, []
    for name, opt, lr, wd_l2, wd_dec in (("momentum", {"name": "sgd", "momentum": 0.9}, 0.05, 0.01, 0.01),
                                         ("adam", "adam", 1e-3, 1e-3, 1e-3)):
        a, ca = run(setup, opt, "l2", lr, wd_l2, test=True, data=data)
        b, cb = run(setup, opt, "decoupled", lr, wd_dec, test=True, data=data)
        nums[f"{name}_distance"] = distance(ca.weights, cb.weights)
        nums[f"{name}_test_l2"], nums[f"{name}_test_decoupled"] = a.metrics["test_error"], b.metrics["test_error"]
        parts.append(f"{name}: final weights {100 * nums[f'{name}_distance']:.1f}% apart (relative L2 distance), "
                     f"test error {100 * a.metrics['test_error']:.1f}% (L2) vs {100 * b.metrics['test_error']:.1f}% "
                     "(decoupled)")
    return Claim("momentum_adam_differ", "With momentum, and with Adam, L2 and decoupled weight decay with the same "
                 "λ are different updates.",
                 f"MLP on MNIST-1D, SGD momentum 0.9 (lr 0.05, λ 0.01) and Adam (lr 1e-3, λ 1e-3), cosine, "
                 f"{setup.epochs} epochs, seed 0", nums, "; ".join(parts))


def claim_rule_098(setup: Setup, data) -> Claim:
    _, Shrink, *_ = instruments()
    nums, parts = {}, []
    short, sdata = short_setup(setup)
    for name, opt, lr in (("sgd", SGD, 0.05), ("adam", "adam", 1e-3)):
        # "every weight": the rule and the arm act on all parameters, biases included (decay_all)
        _, ref = run(short, opt, "none", lr, 0.0, schedule="constant", extra=[Shrink(0.98)], data=sdata)
        _, fixed = run(short, opt, "independent", lr * 0.98, 0.02, schedule="constant", data=sdata, decay_all=True)
        _, plain = run(short, opt, "independent", lr, 0.02, schedule="constant", data=sdata, decay_all=True)
        nums[f"{name}_corrected"] = rel_diff(fixed.weights, ref.weights)
        nums[f"{name}_uncorrected"] = rel_diff(plain.weights, ref.weights)
        parts.append(f"{name}: {nums[f'{name}_corrected']:.1e} with the learning rate scaled by 0.98, "
                     f"{nums[f'{name}_uncorrected']:.1e} without")
    return Claim("rule_098", "Multiplying every weight by 0.98 after each update (w ← 0.98·(w + Δ)) is decoupled "
                 "decay in the schedule-only convention with λ = 0.02 (w ← 0.98·w + Δ) once the learning rate is "
                 "scaled by 0.98 — for SGD and Adam alike.",
                 f"MLP on MNIST-1D, SGD without momentum (lr 0.05) and Adam (lr 1e-3), constant schedule, "
                 f"{SHORT_STEPS} steps, seed 0: `none` + the 0.98 rule on every parameter vs `independent` "
                 "λ = 0.02 on every parameter (decay_all) at 0.98·lr and at lr; largest relative difference of "
                 "the final weights",
                 nums, "; ".join(parts))


#: how the claims' text names a task of the sweeps
TASK_TEXT = {"mlp-mnist1d": "MLP on MNIST-1D", "cnn-mnist1d": "CNN on MNIST-1D",
             "logreg-mnist1d": "logistic regression on MNIST-1D",
             CURVE_TASK: "linear regression on 40 fixed RBF features of 50 noisy samples of a smooth curve"}


def _tasks_text(setup: Setup, tasks) -> str:
    """``MLP on MNIST-1D (Adam lr 0.001, 30 epochs), ...`` for the tasks of a sweep."""
    out = []
    for t in tasks:
        task = setup.task(t)
        data, batches = ("curve1d; ", f", batches of {task.batch_size}") if t == CURVE_TASK else ("", "")
        out.append(f"{TASK_TEXT.get(t, t)} ({data}Adam lr {setup.lr(t):g}, {task.epochs} epochs{batches})")
    return ", ".join(out)


def _gap_text(task: str, x: float) -> str:
    """A gap in the task's metric: ``+11.0 pts`` (error rate) or ``+0.139 MSE``."""
    from ..tasks.names import task_metric

    return f"{100 * x:+.1f} pts" if task_metric(task).is_rate else f"{x:+.3f} MSE"


def claim_norm(sw, setup: Setup) -> Claim:
    nums, parts, series = {}, [], {}
    first = sw[sw.seed == sw.seed.min()]
    for task in dict.fromkeys(first.task):
        for arm, g in first[first.task == task].groupby("arm", sort=False):
            key = arm if task == "mlp-mnist1d" else f"{task}/{arm}"  # every arm on the MLP; L2 and decoupled elsewhere
            m = g.groupby("lam").weight_norm.mean()
            nums[f"{key}_monotone"] = float(bool(np.all(np.diff(m.to_numpy()) < 0)))
            nums[f"{key}_ratio"] = float(m.iloc[-1] / m.iloc[0])
            series[key] = m
            parts.append(f"{key}: ‖w‖ {m.iloc[0]:.3g} → {m.iloc[-1]:.3g} over λ {m.index[0]:.0e}–{m.index[-1]:.0e}"
                         f"{'' if nums[f'{key}_monotone'] else ' (not monotone)'}")
    others = [t for t in dict.fromkeys(first.task) if t != "mlp-mnist1d"]
    return Claim("norm_vs_lambda", "A larger λ gives smaller weights.",
                 f"{_tasks_text(setup, ['mlp-mnist1d'])}, cosine, seed 0, each arm over its own λ values"
                 + (f"; L2 and decoupled also on {_tasks_text(setup, others)}" if others else "")
                 + "; norm of the regularized weights at the end", nums, "; ".join(parts), series={"norm": series})


def claim_gap(sw, setup: Setup, curves: dict) -> Claim:
    from scipy.stats import spearmanr

    from ..stats import mean_ci

    nums, parts, series = {}, [], {}
    for task in dict.fromkeys(sw.task):
        for arm in ("l2", "decoupled"):
            g = sw[(sw.task == task) & (sw.arm == arm)]
            stats = {lam: mean_ci(x.gap_error.to_numpy()) for lam, x in g.groupby("lam")}
            means = np.array([st.mean for st in stats.values()])
            rho = spearmanr(g.lam, g.gap_error)
            key = f"{task}/{arm}"
            nums[f"{key}_monotone"] = float(bool(np.all(np.diff(means) < 0)))
            nums[f"{key}_rho"], nums[f"{key}_p"] = float(rho.statistic), float(rho.pvalue)
            nums[f"{key}_change"] = float(means[-1] - means[0])
            series[key] = stats
            parts.append(f"{task} {arm}: gap {_gap_text(task, means[0])} → {_gap_text(task, means[-1])} from the "
                         f"smallest to the largest λ, Spearman ρ = {rho.statistic:+.2f} (p = {rho.pvalue:.2g})"
                         f"{'' if nums[f'{key}_monotone'] else ', not monotone'}")
    tasks = list(dict.fromkeys(sw.task))
    return Claim("gap_vs_lambda", "A larger λ gives a smaller generalization gap.",
                 f"{_tasks_text(setup, tasks)}; cosine schedule, each λ with seeds {setup.seeds}; gap = test − train "
                 "error at the end (for the regression: test − train mean squared error); Spearman's ρ of λ against "
                 "the per-seed gaps", nums, "; ".join(parts),
                 series={"gap": series, "curves": curves, "sweeps": sw})


def claim_zeros(setup: Setup, data) -> Claim:
    nums, parts, series = {}, [], {}
    lams = setup.lams["l1-decoupled"]
    for arm, wd in (("l1-decoupled", lams), ("l1", [x * 1e-3 for x in lams]), ("l2", [x * 1e-2 for x in lams])):
        zs = []
        for lam in wd:
            r, _ = run(setup, SGD, arm, 0.05, lam, data=data)
            zs.append(r.metrics["zero_fraction"])
        nums[f"{arm}_max_zero_fraction"] = float(max(zs))
        series[arm] = dict(zip(wd, zs))
        parts.append(f"{arm}: at most {100 * max(zs):.1f}% exact zeros")
    return Claim("l1_zeros", "The L1 penalty sets some weights exactly to zero; L2 does not.",
                 "MLP on MNIST-1D, plain SGD lr 0.05, cosine; the fraction of regularized weights that are exactly 0 "
                 "at the end, over a λ sweep per arm (L1 as a gradient term, L1 as a soft threshold, L2)",
                 nums, "; ".join(parts), series={"zeros": series})


def claim_faster(setup: Setup, data) -> Claim:
    _, _, Losses, _ = instruments()
    steps = {"none": [], "decoupled": []}
    for arm, lam in (("none", 0.0), ("decoupled", 0.1)):
        for seed in setup.seeds:
            cb = Losses()
            run(setup, "adam", arm, 1e-3, lam, seed=seed, extra=[cb], data=data)
            steps[arm].append(np.asarray(cb.losses))
    # the threshold: the lowest smoothed loss that every run of both arms reaches (so none is censored)
    k = max(1, min(20, min(len(s) for v in steps.values() for s in v) // 4))
    target = max(float(_smooth(s, k).min()) for v in steps.values() for s in v)
    reach = {arm: [int(np.argmax(_smooth(s, k) <= target)) + k for s in v] for arm, v in steps.items()}
    nums = {"target_loss": target, "steps_none": float(np.mean(reach["none"])),
            "steps_decoupled": float(np.mean(reach["decoupled"]))}
    return Claim("converge_faster", "Weight decay makes training converge faster.",
                 f"MLP on MNIST-1D, Adam lr 1e-3, cosine, seeds {setup.seeds}: steps until the training loss "
                 f"(moving average of {k} steps) first reaches {target:.3f} — the lowest level every run reaches — "
                 "without decay and with decoupled λ = 0.1",
                 nums, f"{nums['steps_none']:.0f} steps without decay, {nums['steps_decoupled']:.0f} with "
                 "(mean over seeds)")


def _smooth(x: np.ndarray, k: int = 20) -> np.ndarray:
    if len(x) < k:
        return x
    return np.convolve(x, np.ones(k) / k, mode="valid")


def claim_adam_v(setup: Setup, data) -> Claim:
    nums, series = {}, {}
    lr, lam = 1e-3, 1e-3
    for arm in ("l2", "decoupled"):
        _, cap = run(setup, "adam", arm, lr, lam, data=data)
        sv = np.concatenate([s for s, _ in cap.sqrt_v])
        step = cap.sqrt_v[0][1]
        v_hat = sv / math.sqrt(1 - 0.999 ** step)  # bias-corrected √v, as Adam divides by
        # the per-step relative shrink each weight gets from the regularizer
        shrink = lr * lam / (v_hat + 1e-8) if arm == "l2" else np.full_like(v_hat, lr * lam)
        lo, hi = np.quantile(v_hat, [0.1, 0.9])
        ratio = float(shrink[v_hat >= hi].mean() / shrink[v_hat <= lo].mean())
        nums[f"{arm}_ratio"] = ratio
        series[arm] = (v_hat, shrink)
    return Claim("adam_sqrt_v", "Under Adam, L2 regularizes weights with a large gradient history (large √v) less "
                 "than decoupled decay does.",
                 "MLP on MNIST-1D, Adam lr 1e-3, λ 1e-3, cosine, seed 0: per weight, the relative shrink per step the "
                 "regularizer applies at the end of training — η·λ/(√v̂+ε) for L2, η·λ for decoupled — against √v̂; "
                 "summary: mean shrink of the 10% of weights with the largest √v̂ over that of the 10% with the "
                 "smallest", nums,
                 f"L2: the large-√v̂ weights shrink {nums['l2_ratio']:.2g}× as fast as the small-√v̂ ones; decoupled: "
                 f"{nums['decoupled_ratio']:.2g}×", series={"adam_v": series})


#: how far (relative) a layer's measured angular update may sit from the prediction and count as "at" it
EQ_TOL = 0.2


def _late_means(table: dict) -> dict[str, dict[str, float]]:
    """Per layer, over the checkpoints of the second half of training: the mean angular update per step
    (weighted by the steps each checkpoint measured), the mean prediction, L2's median per-weight shrink,
    and whether the layer is scale-invariant."""
    import pandas as pd

    t = pd.DataFrame(table)
    t = t[(t.step > t.step.max() / 2) & t.angular_update.notna() & (t.angular_samples > 0)]
    out = {}
    groups = list(t.groupby("layer", sort=False))
    for i, (layer, g) in enumerate(groups):
        w = g.angular_samples.astype(float)
        pred = pd.to_numeric(g.predicted_angular_update, errors="coerce")
        shrink = pd.to_numeric(g.shrink_median, errors="coerce")
        out[_layer_name(layer, bool(g.scale_invariant.iloc[0]), i, len(groups))] = {
            "measured": float((g.angular_update * w).sum() / w.sum()),
            "predicted": float((pred * w).sum() / w.sum()) if pred.notna().all() else math.nan,
            "shrink": float(shrink.mean()) if shrink.notna().any() else math.nan,
            "invariant": bool(g.scale_invariant.iloc[0])}
    return out


def _layer_name(layer: str, invariant: bool, i: int, count: int) -> str:
    """``conv1`` … for the scale-invariant layers (the CNN's convolutions), ``head`` for a last layer that is
    not; else the parameter's name without ``.weight``."""
    if invariant:
        return f"conv{i + 1}"
    return "head" if i == count - 1 else layer.removesuffix(".weight")


def claim_equilibrium(setup: Setup, runs: list[dict]) -> Claim:
    """Each arm's per-layer angular update over the second half of training against the rotational
    equilibrium (:func:`wdstudy.mechanics.equilibrium_angular_update`)."""
    from ..mechanics import equilibrium_angular_update

    eq = setup.equilibrium
    nums: dict[str, float] = {"tol": EQ_TOL}
    parts, series = [], {}
    for r in runs:
        arm, late = r["arm"], _late_means(r["mechanics"])
        if arm == "l2":
            # no prediction exists for Adam + L2: the reference is AdamW's equilibrium at L2's own median
            # per-weight shrink η·λ/(√v̂+ε) over the same checkpoints (the same strength, spread evenly)
            d = float(np.nanmean([v["shrink"] for v in late.values()]))
            ref = equilibrium_angular_update("adam", "decoupled", eq["lr"], d / eq["lr"])[0]
            nums["l2_median_shrink"] = d
            for v in late.values():
                v["predicted"] = ref
        else:
            nums["decoupled_shrink"] = eq["lr"] * eq["lam"]
        nums[f"{arm}_reference"] = float(np.nanmean([v["predicted"] for v in late.values()]))
        series[arm] = late
        layers = []
        for layer, v in late.items():
            ratio = v["measured"] / v["predicted"]
            nums[f"{arm}/{layer}_ratio"] = ratio
            nums[f"{layer}_invariant"] = float(v["invariant"])
            layers.append(f"{layer}{'' if v['invariant'] else ' (not scale-invariant)'} {ratio:.2f}")
        parts.append(f"{'AdamW' if arm == 'decoupled' else 'Adam + L2'}: " + ", ".join(layers))
    return Claim("equilibrium", "Under AdamW every layer's angular update settles at the predicted rotational "
                 "equilibrium √(2ηλ(1−β₁)/(1+β₁)); under Adam + L2 it does not.",
                 f"CNN with batch norm on MNIST-1D ({eq['epochs']} epochs, constant schedule, seed 0), Adam lr "
                 f"{eq['lr']:g}: decoupled λ = {eq['lam']:g} (per-step shrink {eq['lr'] * eq['lam']:.0e}) and L2 "
                 f"λ = {eq['lam_l2']:g}; per layer, the mean angular update per step over the second half of training "
                 "(wdstudy.mechanics) over the prediction — for Adam + L2, which has none, over AdamW's at L2's own "
                 f"median per-weight shrink η·λ/(√v̂+ε) ({nums.get('l2_median_shrink', math.nan):.1e}); "
                 f"\"at\" = within {100 * EQ_TOL:.0f}%. The convolutions (bias-free, followed by batch norm) are "
                 "scale-invariant, the linear head is not",
                 nums, "measured / predicted angular update per layer — " + "; ".join(parts),
                 series={"equilibrium": series})


def claim_timescale(setup: Setup, runs: list[dict]) -> Claim:
    """The best decoupled λ (lowest mean test error over seeds) per training-set size, and its τ_epoch."""
    import pandas as pd

    ts = setup.timescale
    df = pd.DataFrame(runs)
    lams = sorted(df.lam.unique())
    nums: dict[str, float] = {"grid_step": float(lams[1] / lams[0]) if len(lams) > 1 else math.nan,
                              "seeds": float(df.seed.nunique())}
    # the seeds' noise: the standard error of a difference of two λ's mean errors, pooled over sizes and λ
    k = df.seed.nunique()
    noise = float(df.groupby(["train_size", "lam"]).test_error.std().mean() * math.sqrt(2 / k)) if k > 1 else 0.0
    nums["noise"] = noise
    parts, series = [], {}
    for n, g in df.groupby("train_size"):
        m = g.groupby("lam").agg(test_error=("test_error", "mean"), tau_epoch=("tau_epoch", "mean"),
                                 spe=("steps_per_epoch", "first"))
        best = float(m.test_error.idxmin())
        near = m.index[m.test_error <= m.test_error.min() + 2 * noise]
        key = f"n{n}"
        nums.update({f"{key}_best_lam": best, f"{key}_tau_epoch": float(m.tau_epoch[best]),
                     f"{key}_steps_per_epoch": float(m.spe.iloc[0]), f"{key}_best_error": float(m.test_error[best]),
                     f"{key}_edge": float(best in (lams[0], lams[-1])),
                     f"{key}_near_lo": float(near.min()), f"{key}_near_hi": float(near.max())})
        series[int(n)] = m
        parts.append(f"{n:,} examples ({int(m.spe.iloc[0])} steps/epoch): best λ {best:g} (test error "
                     f"{100 * m.test_error[best]:.1f}%), τ_epoch {m.tau_epoch[best]:.2g}"
                     + (f"; within 2 noise SE: λ {near.min():g}–{near.max():g}" if noise else ""))
    return Claim("timescale", "The best decoupled λ falls as the training set grows (as 1/size), while the best "
                 "timescale τ_epoch = 1/(η·λ·steps per epoch) stays put.",
                 f"MLP on MNIST-1D at {', '.join(f'{n:,}' for n in ts['sizes'])} training examples (3,600 is all of "
                 f"MNIST-1D's training split), AdamW lr {ts['lr']:g}, cosine, {ts['epochs']} epochs at every size, "
                 f"decoupled λ ∈ {{{', '.join(f'{x:g}' for x in lams)}}}, seeds {ts['seeds']}; best λ = lowest mean "
                 "test error over the seeds; noise SE = the seeds' standard deviation pooled over the runs × √(2/seeds)",
                 nums, "; ".join(parts) + (f" (noise SE {100 * noise:.1f} pts)" if noise else " (one seed: no noise "
                                           "estimate)"), series={"timescale": series})
