"""Quickstart: a miniature figure 2 on scikit-learn's handwritten digits (no download, CPU).

SGD (KU), edge-popup (KU) and IteRand (KU) on Conv6 at widths 0.25 and 0.5, seeds 1 and 2:
3 methods x 2 widths x 2 seeds = 12 trials of 6 epochs, on CPU cores (the run prints its ETA).
Digits checks the machinery, not the paper's claim: see NOTE.
Digits has 1,257 training images, 20 iterations an epoch at batch 64, so K_per is scaled from
the paper's 300 (of 352 an epoch on CIFAR-10) to 10: IteRand re-randomises 12 times.
    python -m iterand_tune experiments/quickstart.py
Hyperparameter search (`--search`): one figure point per method and width (6 points), searching
lr and weight decay (all methods), p (pruning methods) and K_per and r (IteRand).
"""
from iterand_tune.experiments import Experiment
from iterand_tune.search_space import LogUniform, QUniform, Uniform

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

# --search spaces around the values above.
SGD_SEARCH = dict(lr=LogUniform(1e-3, 0.3), weight_decay=LogUniform(1e-5, 1e-3))
PRUNING_SEARCH = dict(lr=LogUniform(0.03, 1.0), weight_decay=LogUniform(1e-5, 1e-3),
                      conv_sparsity=Uniform(0.3, 0.7))
ITERAND_SEARCH = dict(**PRUNING_SEARCH, rerand_freq=QUniform(5, 40, 5),  # K_per
                      rerand_lambda=LogUniform(0.01, 1.0))               # r

# On digits the networks are large enough for edge-popup: measured over 3 seeds at Conv6
# x0.0625-x0.25, IteRand and edge-popup differ within seed noise, in both directions.
NOTE = ("digits checks the machinery (training, re-randomisation, Ray Tune, analysis); it does "
        "not test the paper's claim. IteRand ahead of edge-popup at small widths is a CIFAR-10 "
        "result: python -m iterand_tune experiments/figure2.py --only figure2_conv6_ku_edgepopup "
        "figure2_conv6_ku_iterand")

EXPERIMENTS = [
    Experiment("quickstart_ku_sgd", dict(**DIGITS, train_mode="normal", lr=0.01),
               dict(model=MODELS, seed=SEEDS), search=SGD_SEARCH, note=NOTE),
    Experiment("quickstart_ku_edgepopup",
               dict(**DIGITS, train_mode="score_only", bn_affine=False, conv_sparsity=0.5, lr=0.3),
               dict(model=MODELS, seed=SEEDS), search=PRUNING_SEARCH, note=NOTE),
    Experiment("quickstart_ku_iterand",
               dict(**DIGITS, train_mode="score_only", bn_affine=False, conv_sparsity=0.5, lr=0.3,
                    rerand_mode="bernoulli", rerand_freq=10, rerand_lambda=0.1),
               dict(model=MODELS, seed=SEEDS), search=ITERAND_SEARCH, note=NOTE),
]
