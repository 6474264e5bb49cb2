"""Quickstart: a miniature figure 2 on scikit-learn's handwritten digits (no download, CPU).

SGD (KU), edge-popup (KU) and IteRand (KU) on Conv6 at widths 0.25 and 0.5, seeds 1 and 2:
3 methods x 2 widths x 2 seeds = 12 trials of 6 epochs; about 3 minutes on 2 CPU cores.
Digits has 1,257 training images, 20 iterations an epoch at batch 64, so K_per is scaled from
the paper's 300 (of 352 an epoch on CIFAR-10) to 10: IteRand re-randomises 12 times.
    python -m iterand_tune experiments/quickstart.py
"""
from iterand_tune.experiments import Experiment

SEEDS = [1, 2]
MODELS = ["conv6x0.25", "conv6x0.5"]

DIGITS = dict(
    dataset="digits",            # 8x8 digit images scaled to 32x32, shipped with scikit-learn
    epochs=6,
    batch_size=64,
    train_augmentation=False,    # crops of 8x8 digits mostly hurt
    optimizer="SGD",
    lr_scheduler="CustomCosineLR",
    weight_decay=1e-4,
    init_mode="kaiming_uniform",
)

EXPERIMENTS = [
    Experiment("quickstart_ku_sgd", dict(**DIGITS, train_mode="normal", lr=0.01),
               dict(model=MODELS, seed=SEEDS)),
    Experiment("quickstart_ku_edgepopup",
               dict(**DIGITS, train_mode="score_only", bn_affine=False, conv_sparsity=0.5, lr=0.3),
               dict(model=MODELS, seed=SEEDS)),
    Experiment("quickstart_ku_iterand",
               dict(**DIGITS, train_mode="score_only", bn_affine=False, conv_sparsity=0.5, lr=0.3,
                    rerand_mode="bernoulli", rerand_freq=10, rerand_lambda=0.1),
               dict(model=MODELS, seed=SEEDS)),
]
