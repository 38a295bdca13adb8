"""Empirical privacy check: a loss-threshold membership-inference attack on DP and non-DP models.

Usage::

    python bench/privacy_audit.py [--dataset breastmnist] [--members 256] [--epochs 30]
                                  [--plain-epochs 100] [--lr 0.2] [--epsilons 8,1]
                                  [--seed 0] [--json]

What it does
------------
Half of the MedMNIST training split (``--members`` images, drawn at random) trains the repo's
``cnn`` model (:func:`common.models.build_model`); the other half, never seen in training, are
the non-members. Three kinds of model are trained with :func:`client.training.train_dp`:
plain SGD (``private=False``, enough epochs to overfit a little) and DP-SGD at each target
epsilon in ``--epsilons`` (delta = 1e-5; the noise multiplier comes from
:func:`common.privacy.plan_noise_multiplier` for the whole training run).

The attack is the loss-threshold attack of Yeom et al., "Privacy Risk in Machine Learning:
Analyzing the Connection to Overfitting" (CSF 2018): an example is guessed to be a member when
its loss under the released model is low. Its score is ``-loss``; the attack AUC is the area
under the ROC curve of that score over members (positives) and non-members (negatives)
(:func:`sklearn.metrics.roc_auc_score`). 0.5 means the attack learns nothing.

The bound implied by (epsilon, delta)
-------------------------------------
For an (epsilon, delta)-DP mechanism any test of "this record was in the training set"
against "it was not", with false-positive rate ``a`` and true-positive rate ``t``, satisfies
(Kairouz, Oh & Viswanath, "The Composition Theorem for Differential Privacy", ICML 2015)::

    t <= e^eps * a + delta        and        1 - a <= e^eps * (1 - t) + delta

so the best possible ROC curve is ``f(a) = min(1, e^eps * a + delta, 1 - e^-eps * (1 - delta - a))``
and the attack AUC is at most::

    AUC_max(eps, delta) = integral_0^1 f(a) da

evaluated here in closed form by integrating the two line pieces (they cross at
``a* = (1 - delta) / (1 + e^eps)``; the second reaches 1 at ``a = 1 - delta``). Caveats: the
bound holds for the test on one record; the empirical AUC pools many records and has sampling
error (about +-0.03 with 256 + 256 examples); a loss-threshold attack is weak, so an AUC far
below the bound is expected and does not by itself show that epsilon is loose. Each MedMNIST
image counts as one patient here.

Runtime: about 1-3 minutes on 2 CPU cores (28x28 BreastMNIST, one torch thread).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

DELTA = 1e-5
DATASETS = {"breastmnist": "medmnist/breastmnist.npz",
            "pneumoniamnist": "medmnist/pneumoniamnist.npz"}


def auc_bound(epsilon: float, delta: float) -> float:
    """Largest attack AUC an (epsilon, delta)-DP mechanism allows (see the module docstring).

    ``integral_0^1 min(1, e^eps a + delta, 1 - e^-eps (1 - delta - a)) da`` in closed form.
    """
    if math.isinf(epsilon):
        return 1.0
    e = math.exp(epsilon)
    a_star = (1.0 - delta) / (1.0 + e)          # where the two lines cross
    a_one = 1.0 - delta                          # where the second line reaches 1
    first = e * a_star**2 / 2.0 + delta * a_star  # integral of e*a + delta over [0, a*]
    # integral of 1 - (1 - delta - a)/e over [a*, 1 - delta]
    second = (a_one - a_star) - ((1.0 - delta - a_star) ** 2) / (2.0 * e)
    return min(1.0, first + second + delta)      # f = 1 over [1 - delta, 1]


def _load(dataset: str, members: int, seed: int) -> dict[str, Any]:
    import torch

    from client.data.medmnist import load_medmnist
    from common.shared_data import require_shared_file

    splits = load_medmnist(require_shared_file(DATASETS[dataset]))
    images, labels = splits["train"]
    if 2 * members > len(labels):
        raise SystemExit(f"--members {members} is too many: the train split has {len(labels)}")
    order = np.random.default_rng(seed).permutation(len(labels))
    norm = (torch.from_numpy(images) - 0.5) / 0.5
    lab = torch.from_numpy(labels).long().reshape(-1)
    test_x, test_y = splits["test"]
    return {
        "member_x": norm[order[:members]], "member_y": lab[order[:members]],
        "non_x": norm[order[members:2 * members]], "non_y": lab[order[members:2 * members]],
        "test_x": (torch.from_numpy(test_x) - 0.5) / 0.5,
        "test_y": torch.from_numpy(test_y).long().reshape(-1),
        "image_size": int(images.shape[-1]),
    }


def _losses(model: Any, x: Any, y: Any) -> tuple[np.ndarray, float]:
    import torch
    from torch import nn

    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y, reduction="none")
        acc = float((logits.argmax(1) == y).float().mean())
    return loss.numpy().astype(np.float64), acc


def _attack(data: dict[str, Any], *, private: bool, target_epsilon: float | None,
            settings: dict[str, Any]) -> dict[str, Any]:
    import torch
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import TensorDataset

    from client.training import train_dp
    from common.models import build_model
    from common.privacy import plan_noise_multiplier, sample_rate, steps_per_epoch

    n = len(data["member_y"])
    torch.manual_seed(settings["seed"])
    model = build_model("cnn", image_size=data["image_size"])
    sigma = 0.0
    if private:
        assert target_epsilon is not None
        q = sample_rate(n, settings["batch_size"])
        steps = settings["epochs"] * steps_per_epoch(n, settings["batch_size"])
        sigma = plan_noise_multiplier(target_epsilon=target_epsilon, delta=DELTA,
                                      sample_rate=q, steps=steps)
    start = time.perf_counter()
    result = train_dp(
        model, TensorDataset(data["member_x"], data["member_y"]),
        epochs=settings["epochs"] if private else settings["plain_epochs"],
        batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"] if private else settings["learning_rate_plain"],
        noise_multiplier=sigma, max_grad_norm=settings["max_grad_norm"], delta=DELTA,
        private=private, seed=settings["seed"],
    )
    train_s = time.perf_counter() - start
    model.load_state_dict(result.state_dict)
    member_loss, member_acc = _losses(model, data["member_x"], data["member_y"])
    non_loss, non_acc = _losses(model, data["non_x"], data["non_y"])
    _, test_acc = _losses(model, data["test_x"], data["test_y"])
    scores = -np.concatenate([member_loss, non_loss])
    truth = np.concatenate([np.ones(len(member_loss)), np.zeros(len(non_loss))])
    eps = result.epsilon if private else math.inf
    return {
        "model": f"dp eps={target_epsilon:g}" if private else "non-dp",
        "private": private,
        "epsilon": None if math.isinf(eps) else eps,
        "delta": DELTA if private else None,
        "noise_multiplier": sigma,
        "steps": result.steps,
        "attack_auc": float(roc_auc_score(truth, scores)),
        "auc_bound": auc_bound(eps, DELTA) if private else 1.0,
        "member_accuracy": member_acc,
        "non_member_accuracy": non_acc,
        "test_accuracy": test_acc,
        "mean_member_loss": float(member_loss.mean()),
        "mean_non_member_loss": float(non_loss.mean()),
        "train_s": train_s,
    }


def run(settings: dict[str, Any]) -> dict[str, Any]:
    """Train the models, attack them, return the summary dict."""
    import torch

    torch.set_num_threads(settings["threads"])
    data = _load(settings["dataset"], settings["members"], settings["seed"])
    rows = [_attack(data, private=False, target_epsilon=None, settings=settings)]
    for eps in settings["epsilons"]:
        rows.append(_attack(data, private=True, target_epsilon=eps, settings=settings))
    return {"benchmark": "privacy_audit", "attack": "loss-threshold (Yeom et al. 2018)",
            "settings": settings, "results": rows}


def _print_table(summary: dict[str, Any]) -> None:
    s = summary["settings"]
    print(f"Loss-threshold membership inference on {s['dataset']} ({s['members']} members vs "
          f"{s['members']} non-members; {s['plain_epochs']} epochs non-DP, {s['epochs']} DP-SGD; "
          f"delta={DELTA:g})")
    print(f"{'model':>12} {'epsilon':>8} {'attack AUC':>11} {'AUC bound':>10} "
          f"{'train acc':>10} {'test acc':>9} {'secs':>6}")
    for r in summary["results"]:
        eps = "inf" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        print(f"{r['model']:>12} {eps:>8} {r['attack_auc']:>11.3f} {r['auc_bound']:>10.4f} "
              f"{r['member_accuracy']:>10.3f} {r['test_accuracy']:>9.3f} {r['train_s']:>6.1f}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="breastmnist")
    parser.add_argument("--members", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=30, help="DP-SGD epochs")
    parser.add_argument("--plain-epochs", type=int, default=100,
                        help="epochs of the non-DP model (long enough to overfit)")
    parser.add_argument("--lr", type=float, default=0.2, help="DP-SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epsilons", default="8,1", help="comma-separated DP targets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    settings = {
        "dataset": args.dataset, "members": args.members, "epochs": args.epochs,
        "plain_epochs": args.plain_epochs, "batch_size": args.batch_size,
        "learning_rate": args.lr, "learning_rate_plain": 0.05,
        "max_grad_norm": 1.0, "seed": args.seed, "threads": args.threads,
        "epsilons": [float(e) for e in args.epsilons.split(",") if e.strip()],
    }
    summary = run(settings)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_table(summary)


if __name__ == "__main__":
    main()
