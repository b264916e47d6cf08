"""Each defense's wired-up `train_step` against its authors' training step, transcribed here.

Every `*_reference_step` below is written from the authors' repository (cited in its docstring) in
that code's own shape: its own PGD loop, its own loss expressions, its own bookkeeping (FAT's
shrinking batch, MMA's gradient cloning, Free-AT's global noise buffer). None of it calls the
harness. A test runs one step of ours and one reference step from the same weights, the same
optimiser state and the same RNG seed on a small BatchNorm CNN, and requires the same adversarial
examples, loss, parameters after the SGD step and per-example state, within float tolerance.

Where the reference draws randomness differently (numpy for FAT's start, a shrinking batch for
FAT's step noise), the transcription consumes torch's generator in the order ours does and keeps
the reference's law (uniform in the ball, Gaussian noise per remaining example); that is
bookkeeping of the random source, not of the algorithm.

Inputs: PGD-AT, FAT and Free-AT use the batch as is (their reference clamps exactly as ours does).
TRADES, MART, MMA and IAAT use pixels kept in [0.08, 0.92], where the documented differences in
box clamping (ours projects the random start into [0, 1]; the references clamp only after a step
or, MMA, never clamp x + eps* u) cannot act: every perturbation here stays below 0.08. BatchNorm
buffers are compared only where the reference runs the same train-mode forwards in the same order.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from harness.core.datasets import Batch
from harness.core.defense import DefenseContext
from methods.fat import FAT, FATConfig
from methods.free_at import FreeAT, FreeATConfig
from methods.iaat import IAAT, IAATConfig
from methods.mart import MART, MARTConfig
from methods.mma import MMA, MMAConfig
from methods.pgd_at import PGDAT, PGDATConfig
from methods.trades import TRADES, TRADESConfig

EPS = 8 / 255
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4
ATOL = 1e-9  # float64 tolerance: the same arithmetic in a different order


# ------------------------------------------------------------------------------------------ harness


def context(info, train_size=32, epochs=10, eps=None):
    return DefenseContext(
        eps=info.eps if eps is None else eps,
        dataset=info,
        train_size=train_size,
        epochs=epochs,
        device=torch.device("cpu"),
    )


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


class TrainingInputs:
    """Records the input of every forward that trains: train mode, autograd on, weights not frozen."""

    def __init__(self, model):
        self.inputs: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(self._hook)
        self.model = model

    def _hook(self, module, args):
        if module.training and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            self.inputs.append(args[0].detach().clone())

    def close(self):
        self.handle.remove()


def run_ours(defense, model, batch, seed=0) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    opt = sgd(model)
    log = TrainingInputs(model)
    torch.manual_seed(seed)
    stats = defense.train_step(model, opt, batch)
    log.close()
    return stats, log.inputs


def assert_same_parameters(ours, ref):
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.allclose(a, b, atol=ATOL, rtol=1e-5), f"{name} differs by {(a - b).abs().max():.3g}"


def assert_same_buffers(ours, ref):
    for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
        assert torch.allclose(a.float(), b.float(), atol=ATOL, rtol=1e-5), f"buffer {name} differs"


def assert_close(a, b, what, atol=ATOL):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.allclose(a, b, atol=atol, rtol=1e-5), f"{what} differs by {(a - b).abs().max():.3g}"


@pytest.fixture(autouse=True)
def float64():
    """Double precision. A signed-gradient attack is chaotic: one gradient component whose sign two
    correct float32 implementations round differently (a different summation order, a smaller batch)
    moves a pixel by 2 steps and the trajectories part. In float64 that does not happen here."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


@pytest.fixture
def batch(train_batch, float64) -> Batch:
    """NCHW (so torch.rand(x.shape) and rand_like(x) draw the same values), pixels as stored."""
    return Batch(train_batch.x.double().contiguous(), train_batch.y, train_batch.index)


@pytest.fixture
def interior_batch(batch) -> Batch:
    return Batch(batch.x.clamp(0.08, 0.92), batch.y, batch.index)


@pytest.fixture
def twins(trained_model, float64):
    """Two copies of one trained model: one for our step, one for the reference step."""
    model = trained_model.double()
    return model, copy.deepcopy(model)


# ------------------------------------------------------------------------------------------ PGD-AT


def rice_pgd_at_reference_step(model, opt, X, y, epsilon, alpha, attack_iters):
    """locuslab/robust_overfitting train_cifar.py, `attack_pgd` (one restart, l_inf) and the training
    loop body: train-mode attack whose delta starts uniform in the ball and clamped into the box,
    a restart-scoring forward, then CE on clamp(X + delta)."""
    model.train()
    delta = torch.zeros_like(X).uniform_(-epsilon, epsilon)
    delta = torch.max(torch.min(delta, 1 - X), 0 - X)
    delta.requires_grad = True
    for _ in range(attack_iters):
        out = model(X + delta)
        F.cross_entropy(out, y).backward()
        moved = torch.clamp(delta.data + alpha * torch.sign(delta.grad.detach()), -epsilon, epsilon)
        delta.data = torch.max(torch.min(moved, 1 - X), 0 - X)
        delta.grad.zero_()
    F.cross_entropy(model(X + delta), y, reduction="none")  # the reference scores its restart (BN sees it)
    delta = delta.detach()
    x_adv = torch.clamp(X + delta, 0, 1)
    robust_loss = F.cross_entropy(model(x_adv), y)
    opt.zero_grad()
    robust_loss.backward()
    opt.step()
    return x_adv, robust_loss.detach()


def pgd_at(info, **overrides):
    return PGDAT(PGDATConfig(**overrides), context(info))


def test_pgd_at_step_matches_rice_et_al(twins, batch, synthetic_info):
    ours, ref = twins
    stats, inputs = run_ours(pgd_at(synthetic_info), ours, batch)

    ref_opt = sgd(ref)
    torch.manual_seed(0)
    x_adv, loss = rice_pgd_at_reference_step(ref, ref_opt, batch.x, batch.y, EPS, 2 / 255, 10)

    assert_close(inputs[-1], x_adv, "adversarial examples")
    assert (x_adv - batch.x).abs().max() > 0.9 * EPS  # the attack moved (not a zero perturbation)
    assert_close(stats["loss"], loss, "loss")
    assert_same_parameters(ours, ref)
    # BN buffers differ by design: the reference's restart-scoring forward updates them once more.


# ------------------------------------------------------------------------------------------ TRADES


def trades_reference_step(model, opt, x_natural, y, step_size, epsilon, perturb_steps, beta):
    """yaodongyu/TRADES trades.py `trades_loss` (l_inf) plus the optimiser step of train_trades_cifar10.py:
    eval-mode attack on the summed KL from x + 0.001 N(0, 1); train-mode CE + beta * KL_sum / B with
    the clean forward run again inside the KL (not detached)."""
    kl_sum = torch.nn.KLDivLoss(reduction="sum")
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = kl_sum(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    opt.zero_grad()
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(x_natural)) * kl_sum(
        F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1)
    )
    loss = loss_natural + beta * loss_robust
    loss.backward()
    opt.step()
    return x_adv, loss.detach(), loss_robust.detach()


def test_trades_step_matches_trades_loss(twins, interior_batch, synthetic_info):
    ours, ref = twins
    b = interior_batch
    stats, inputs = run_ours(TRADES(TRADESConfig(), context(synthetic_info)), ours, b)

    ref_opt = sgd(ref)
    torch.manual_seed(0)
    x_adv, loss, kl = trades_reference_step(ref, ref_opt, b.x, b.y, 0.007 / 0.031 * EPS, EPS, 10, 6.0)

    assert_close(inputs[-1], x_adv, "adversarial examples")
    assert_close(inputs[0], b.x, "clean training input")
    assert_close(stats["kl"], kl, "KL term")
    assert float(kl) > 1e-4  # beta multiplies something
    assert_close(stats["loss"], loss, "loss")
    assert_same_parameters(ours, ref)
    # BN buffers differ by design: the reference's second clean forward (inside the KL) updates them again.


# ------------------------------------------------------------------------------------------ MART


def mart_reference_step(model, opt, x_natural, y, step_size, epsilon, perturb_steps, beta):
    """YisenWang/MART mart.py `mart_loss` and its optimiser step: eval-mode CE attack from
    x + 0.001 N(0, 1); boosted CE on x' with the strongest wrong class from argsort; KL(p(x) || p(x'))
    summed over classes, weighted by (1.0000001 - p_y(x)), averaged over the batch."""
    kl = torch.nn.KLDivLoss(reduction="none")
    model.eval()
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    opt.zero_grad()
    logits = model(x_natural)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1)).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs)
    )
    loss = loss_adv + float(beta) * loss_robust
    loss.backward()
    opt.step()
    return x_adv, loss.detach(), loss_robust.detach()


def test_mart_step_matches_mart_loss(twins, interior_batch, synthetic_info):
    ours, ref = twins
    b = interior_batch
    stats, inputs = run_ours(MART(MARTConfig(), context(synthetic_info)), ours, b)

    ref_opt = sgd(ref)
    torch.manual_seed(0)
    x_adv, loss, weighted_kl = mart_reference_step(ref, ref_opt, b.x, b.y, 0.007 / 0.031 * EPS, EPS, 10, 6.0)

    assert_close(inputs[-1], x_adv, "adversarial examples")
    assert_close(stats["weighted_kl"], weighted_kl, "weighted KL")
    assert float(weighted_kl) > 1e-5
    assert_close(stats["loss"], loss, "loss")
    assert_same_parameters(ours, ref)
    assert_same_buffers(ours, ref)  # the same train-mode forwards (clean, then adversarial)


# ------------------------------------------------------------------------------------------ FAT


def fat_reference_step(model, opt, data, target, step_size, epsilon, perturb_steps, tau, omega):
    """zjfheart/Friendly-Adversarial-Training earlystop.py `earlystop` (uniform start, 'cent') and
    FAT.py `train`: the batch shrinks as examples stop; an example misclassified with no budget
    left leaves with its current iterate; the rest step with CE's sign plus omega-noise.
    Returns the friendly examples in the original order, the loss and the reference's `count`."""
    model.eval()
    n = len(target)
    # numpy's U(-eps, eps) in the reference; the same law from torch's generator here
    iter_adv = torch.clamp(data + (torch.rand(data.shape) * 2 - 1) * epsilon, 0.0, 1.0)
    where = torch.arange(n)  # original position of each row still iterated
    control = torch.ones(n) * tau
    clean, labels = data, target
    out_adv: list[torch.Tensor] = []
    out_where: list[torch.Tensor] = []
    count, K = 0, perturb_steps
    while K > 0:
        iter_adv.requires_grad_()
        output = model(iter_adv)
        keep, leave = earlystop_partition(output.max(1)[1], labels, control)
        if leave:
            out_adv.append(iter_adv[leave].detach())
            out_where.append(where[leave])
        model.zero_grad()
        loss_adv = F.cross_entropy(output, labels)
        loss_adv.backward(retain_graph=True)
        grad = iter_adv.grad
        if not keep:
            break
        noise = torch.randn(data.shape)[where[keep]]  # one draw per example still stepping
        control, where, clean, labels = control[keep], where[keep], clean[keep], labels[keep]
        iter_adv = iter_adv[keep].detach() + step_size * grad[keep].sign() + omega * noise
        iter_adv = torch.min(torch.max(iter_adv, clean - epsilon), clean + epsilon)
        iter_adv = torch.clamp(iter_adv, 0, 1)
        count += len(labels)
        K -= 1
    else:
        out_adv.append(iter_adv.detach())
        out_where.append(where)
    return (*fat_reference_train(model, opt, torch.cat(out_adv), torch.cat(out_where), target), count)


def earlystop_partition(pred, labels, control) -> tuple[list[int], list[int]]:
    """earlystop's per-example test, as the reference loops it: a misclassified example with budget
    left spends one step of `control` (in place) and keeps stepping, one with none leaves; a correct
    one keeps stepping. Returns (keep, leave) positions."""
    keep, leave = [], []
    for i in range(len(pred)):
        if pred[i] != labels[i]:
            if control[i] == 0:
                leave.append(i)
            else:
                control[i] -= 1
                keep.append(i)
        else:
            keep.append(i)
    return keep, leave


def fat_reference_train(model, opt, friendly, positions, target):
    """FAT.py `train`: one SGD step on the friendly examples; they come back in the original order, with the loss."""
    model.train()
    opt.zero_grad()
    loss = F.cross_entropy(model(friendly), target[positions])
    loss.backward()
    opt.step()
    ordered = torch.empty_like(friendly)
    ordered[positions] = friendly
    return ordered, loss.detach()


@pytest.mark.parametrize("tau", [0, 2])
def test_fat_step_matches_earlystop(twins, batch, synthetic_info, tau):
    ours, ref = twins
    # 16/255: PGD fools most of this model's examples within 10 steps (8/255 fools none), so stops happen
    fat = FAT(FATConfig(taus=(tau,), tau_milestones=()), context(synthetic_info, eps=Fraction(16, 255)))
    fat.start_epoch(0)
    stats, inputs = run_ours(fat, ours, batch)

    ref_opt = sgd(ref)
    torch.manual_seed(0)
    eps = 16 / 255
    x_adv, loss, count = fat_reference_step(ref, ref_opt, batch.x, batch.y, 0.007 / 0.031 * eps, eps, 10, tau, 0.001)

    assert 0 < count < 10 * len(batch.y)  # early stopping acted on some examples, not all at once
    assert_close(inputs[-1], x_adv, "friendly adversarial examples")
    assert fat.end_epoch(0)["mean_steps"] == pytest.approx(count / len(batch.y))
    assert_close(stats["loss"], loss, "loss", atol=1e-5)
    assert_same_parameters(ours, ref)


# ------------------------------------------------------------------------------------------ MMA


def soft_logit_margin_reference(logits, targets):
    """advertorch SoftLogitMarginLoss(reduction='none'): logsumexp over the other classes minus the true logit."""
    rows = torch.arange(len(targets))
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[rows, targets] = False
    others = logits[mask].reshape(len(targets), logits.shape[1] - 1)
    return torch.logsumexp(others, dim=1) - logits[rows, targets]


def advertorch_linf_pgd(model, x, y, eps, eps_iter, nb_iter):
    """advertorch LinfPGDAttack.perturb with rand_init, summed soft-logit-margin loss, per-sample eps;
    run by ANPGD under ctx_noparamgrad_and_eval (eval mode)."""
    e, step = eps.view(-1, 1, 1, 1), eps_iter.view(-1, 1, 1, 1)
    delta = torch.zeros_like(x).uniform_(-1, 1) * e
    delta = torch.clamp(x + delta, 0.0, 1.0) - x
    delta.requires_grad_()
    for _ in range(nb_iter):
        soft_logit_margin_reference(model(x + delta), y).sum().backward()
        delta.data = delta.data + step * delta.grad.data.sign()
        delta.data = torch.max(torch.min(delta.data, e), -e)
        delta.data = torch.clamp(x.data + delta.data, 0.0, 1.0) - x.data
        delta.grad.data.zero_()
    return torch.clamp(x + delta, 0.0, 1.0).detach()


def anpgd_reference(model, x, y, prev_eps, maxeps, nb_iter=10, eps_iter_scale=2.5, num_search_steps=10):
    """BorealisAI/mma_training anpgd.py ANPGD.perturb and `bisection_search` (bisection in train mode)."""
    model.eval()
    xadv = advertorch_linf_pgd(model, x, y, prev_eps, eps_iter_scale * prev_eps / nb_iter, nb_iter)
    model.train()
    unit = (xadv - x) * (1.0 / (prev_eps + 1e-12)).view(-1, 1, 1, 1)
    margin = soft_logit_margin_reference(model(xadv), y)
    cur_eps, cur_min, cur_max = prev_eps, torch.zeros_like(margin), maxeps * torch.ones_like(margin)
    for _ in range(num_search_steps):
        cur_min = torch.max((margin < 0).float() * cur_eps, cur_min)
        cur_max = torch.min((margin < 0).float() * maxeps + (margin >= 0).float() * cur_eps, cur_max)
        cur_eps = (cur_min + cur_max) / 2
        margin = soft_logit_margin_reference(model(torch.clamp(x + cur_eps.view(-1, 1, 1, 1) * unit, 0.0, 1.0)), y)
    return x + cur_eps.view(-1, 1, 1, 1) * unit, cur_eps


def mma_reference_step(model, opt, data, idx, target, dct_eps, hinge_maxeps, mineps, clean_loss_coeff=1 / 3):
    """BorealisAI/mma_training trainer.py Trainer.train_one_batch, get_eps, update_eps: clean CE
    gradient cloned; AN-PGD on soft-margin-correct examples from max(mineps, remembered eps); CE at the
    margin for those below the hinge plus CE on clean inputs of the wrong ones, summed / B; the two
    gradients combined (1 - c) * MMA + c * clean; eps stored (0 for wrong examples)."""
    params = list(model.parameters())
    model.train()
    clnoutput = model(data)
    clean_grads = torch.autograd.grad(F.cross_entropy(clnoutput, target), params)
    search = soft_logit_margin_reference(clnoutput.detach(), target)
    correct, wrong = search < 0, search >= 0
    data = data.clone()
    curr_eps = data.new_zeros(len(data))
    if correct.any():
        prev_eps = data.new_tensor([max(mineps, dct_eps.setdefault(int(i), mineps)) for i in idx[correct]])
        adv, eps_correct = anpgd_reference(model, data[correct], target[correct], prev_eps, 1.05 * hinge_maxeps)
        data[correct] = adv.detach()
        curr_eps[correct] = eps_correct
    model.train()
    out = model(data)
    margin_loss = F.cross_entropy(out[correct], target[correct], reduction="none")
    margin_loss = margin_loss[hinge_maxeps > curr_eps[correct]]
    cls_loss = F.cross_entropy(out[wrong], target[wrong]) if wrong.any() else out.new_zeros(())
    mma_loss = (margin_loss.sum() + cls_loss * int(wrong.sum())) / len(data)
    mma_grads = torch.autograd.grad(mma_loss, params)
    opt.zero_grad()
    for p, g_mma, g_clean in zip(params, mma_grads, clean_grads):
        p.grad = (1 - clean_loss_coeff) * g_mma + clean_loss_coeff * g_clean
    opt.step()
    for j, i in enumerate(idx):
        dct_eps[int(i)] = float(curr_eps[j])
    total = clean_loss_coeff * F.cross_entropy(clnoutput, target) + (1 - clean_loss_coeff) * mma_loss
    return data, total.detach(), curr_eps, correct


def test_mma_step_matches_train_one_batch(twins, interior_batch, synthetic_info):
    ours, ref = twins
    b = interior_batch
    d_max_rel = 0.75  # a hinge below many margins, so both sides of it are exercised
    mma = MMA(MMAConfig(d_max_rel=d_max_rel), context(synthetic_info))
    mma.setup(ours)
    remembered = torch.where(torch.arange(32) % 2 == 0, torch.linspace(0, 1.2 * EPS, 32), torch.zeros(32))
    mma.eps_state = remembered.clone()
    stats, inputs = run_ours(mma, ours, b)

    ref_opt = sgd(ref)
    dct_eps = {i: float(remembered[i]) for i in range(32) if i % 2 == 0}  # odd ones: never visited
    torch.manual_seed(0)
    x_mix, loss, eps, correct = mma_reference_step(
        ref, ref_opt, b.x, b.index, b.y, dct_eps, hinge_maxeps=d_max_rel * EPS, mineps=0.159375 * EPS
    )

    hinge = d_max_rel * EPS
    assert 0 < int(correct.sum()) < len(b.y)  # correct and misclassified examples both present
    assert bool((eps[correct] < hinge).any()) and bool((eps[correct] >= hinge).any())  # both hinge sides
    assert_close(inputs[-1], x_mix, "inputs at the margin")
    assert_close(mma.eps_state[b.index], eps, "stored eps")
    assert_close(stats["loss"], loss, "loss")
    assert_same_parameters(ours, ref)
    assert_same_buffers(ours, ref)  # same train-mode forwards: clean, margin at x_adv, bisection, training


# ------------------------------------------------------------------------------------------ Free-AT


def free_at_reference_minibatch(model, opt, input, target, global_noise, n_repeats, fgsm_step, clip_eps):
    """mahyarnajibi/FreeAdversarialTraining main_free.py `train`, one minibatch: m replays, each one
    forward on clamp(input + noise), one backward, the global noise ascended by fgsm_step * sign and
    clipped, then the optimiser step."""
    losses = []
    model.train()
    for _ in range(n_repeats):
        noise_batch = global_noise[0 : input.size(0)].clone().requires_grad_(True)
        in1 = torch.clamp(input + noise_batch, 0, 1.0)
        loss = F.cross_entropy(model(in1), target)
        opt.zero_grad()
        loss.backward()
        global_noise[0 : input.size(0)] += fgsm_step * torch.sign(noise_batch.grad)
        global_noise.clamp_(-clip_eps, clip_eps)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_free_at_minibatch_matches_main_free(twins, batch, synthetic_info):
    ours, ref = twins
    free = FreeAT(FreeATConfig(replays=3), context(synthetic_info))
    torch.manual_seed(5)
    carried = (torch.rand(40, *batch.x.shape[1:]) * 2 - 1) * EPS  # noise left by earlier, larger minibatches
    free.delta = carried.clone()
    stats, inputs = run_ours(free, ours, batch)

    ref_opt = sgd(ref)
    noise = carried.clone()
    losses = free_at_reference_minibatch(ref, ref_opt, batch.x, batch.y, noise, 3, EPS, EPS)

    assert len(inputs) == 3
    assert_close(inputs[0], torch.clamp(batch.x + carried[:32], 0, 1), "first replay input")
    assert_close(free.delta, noise, "persistent noise buffer")
    assert_close(stats["loss"], losses.mean(), "mean replay loss")
    assert_same_parameters(ours, ref)


# ------------------------------------------------------------------------------------------ IAAT


def iaat_pgd_adaptive(x, y, net, attack_steps, lr_arr, eps_arr):
    """yogeshbalaji/Instance_Adaptive_Adversarial_Training attacks/pgd_adaptive.py (untargeted,
    random init): start at x + U(-eps_i, eps_i), then signed CE steps, clipped to the eps_i ball and [0, 1]."""
    lr_arr, eps_arr = lr_arr.view(-1, 1, 1, 1), eps_arr.view(-1, 1, 1, 1)
    x_adv = x.clone() + (torch.rand(x.size(), dtype=x.dtype) - 0.5) * 2 * eps_arr
    for _ in range(attack_steps):
        x_adv.requires_grad = True
        net.zero_grad()
        F.cross_entropy(net(x_adv), y).backward()
        x_adv = x_adv + lr_arr * x_adv.grad.detach().sign()
        diff = torch.min(torch.max(x_adv - x, -eps_arr), eps_arr)
        x_adv = torch.clamp((diff + x).detach(), 0, 1)
    return x_adv


def iaat_reference_step(model, opt, input, target, indices, memory, epoch, args):
    """trainers/trainer_adaptive.py `epsilon_select` and the `train` loop body (model in train mode
    throughout): warm-up eps = attack_eps if correct else 0; afterwards probe eps_prev and
    eps_prev + gamma, move up / stay / move down, zero for clean mistakes, clamp at 0, smooth with
    beta; store; PGD at eps with step max(eps / (0.5 * steps), attack_lr); CE step."""
    model.train()
    with torch.no_grad():
        correct_clean = (model(input).max(1)[1] == target).float()
    if epoch < args["warmup"]:
        epsilon = torch.zeros(input.size(0)).fill_(args["attack_eps"]) * correct_clean
    else:
        prev = memory[indices]
        low, cur, high = prev - args["gamma"], prev, prev + args["gamma"]
        lr_cur = torch.clamp(cur / (0.5 * args["attack_steps"]), min=args["attack_lr"])
        lr_high = torch.clamp(high / (0.5 * args["attack_steps"]), min=args["attack_lr"])
        input_cur = iaat_pgd_adaptive(input, target, model, args["attack_steps"], lr_cur, cur)
        input_high = iaat_pgd_adaptive(input, target, model, args["attack_steps"], lr_high, high)
        with torch.no_grad():
            pred_cur = (model(input_cur).max(1)[1] == target).float()
            pred_high = (model(input_high).max(1)[1] == target).float()
            epsilon = pred_high * high + (1 - pred_high) * pred_cur * cur + (1 - pred_high) * (1 - pred_cur) * low
            epsilon = torch.clamp(epsilon * correct_clean, min=0)
            epsilon = epsilon * args["beta"] + prev * (1 - args["beta"])
    memory[indices] = epsilon.to(memory.dtype)  # the reference memory is a FloatTensor
    lr_arr = torch.clamp(epsilon / (0.5 * args["attack_steps"]), min=args["attack_lr"])
    adv = iaat_pgd_adaptive(input, target, model, args["attack_steps"], lr_arr, epsilon)
    model.zero_grad()
    opt.zero_grad()
    loss = F.cross_entropy(model(adv), target)
    loss.backward()
    opt.step()
    return adv, loss.detach()


IAAT_ARGS = {"warmup": 1, "attack_eps": EPS, "gamma": 1.9 / 255, "beta": 0.1, "attack_steps": 10, "attack_lr": 2 / 255}


@pytest.mark.parametrize("epoch", [0, 1], ids=["warm-up", "adaptive"])
def test_iaat_step_matches_trainer_adaptive(twins, interior_batch, synthetic_info, epoch):
    ours, ref = twins
    b = interior_batch
    iaat = IAAT(IAATConfig(), context(synthetic_info, epochs=10))  # warm-up: 1 epoch of 10
    iaat.setup(ours)
    # float32 as in a real run; above 10/255 the step is eps / 5, not 2/255
    remembered = torch.linspace(0, 14 / 255, 32, dtype=torch.float32)
    iaat.eps_state = remembered.clone()
    iaat.start_epoch(epoch)
    stats, inputs = run_ours(iaat, ours, b)

    ref_opt = sgd(ref)
    memory = remembered.clone()
    torch.manual_seed(0)
    x_adv, loss = iaat_reference_step(ref, ref_opt, b.x, b.y, b.index, memory, epoch, IAAT_ARGS)

    assert_close(iaat.eps_state, memory, "eps memory")
    if epoch:
        assert bool((memory > 10 / 255).any())  # the eps / 5 branch of the step rule is exercised
    assert_close(inputs[-1], x_adv, "adversarial examples")
    assert_close(stats["loss"], loss, "loss")
    assert_same_parameters(ours, ref)
