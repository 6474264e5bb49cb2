"""Figure 1 of the paper: the effect of the re-randomisation rate r on IteRand (CIFAR-10).

KU weights, K_per = 300, r in {0, 0.01, 0.1, 1.0} (r = 0 is edge-popup), seeds 1-3, 100 epochs:
3 networks x 4 r x 3 seeds = 36 trials.
Compute: about 7 GPU-hours (an estimate from forward FLOPs at 25 TFLOP/s sustained, not a
measurement; small networks are overhead-bound and take longer than this).
    python -m iterand_tune experiments/figure1.py
Hyperparameter search (`--search`): one figure point per network and r, searching lr, weight decay
and K_per around the paper's values (p stays fixed: the figure studies r at the paper's p).
"""
from iterand_tune.experiments import Experiment
from iterand_tune.search_space import LogUniform, QUniform

SEEDS = [1, 2, 3]
R_VALUES = [0.0, 0.01, 0.1, 1.0]

CIFAR10 = dict(
    dataset="cifar10",
    epochs=100,
    batch_size=128,
    optimizer="SGD",
    lr_scheduler="CustomCosineLR",  # cosine, stepped once per epoch, no warm-up
    padding_before_crop=True,       # pad 4 px before the random-resized crop
)

ITERAND_KU = dict(
    train_mode="score_only",         # only the scores are trained
    bn_affine=False,
    init_mode="kaiming_uniform",     # KU weights
    rerand_mode="bernoulli",
    rerand_freq=300,                 # K_per: re-randomise every 300 iterations
)

# --search: r is the figure's axis, so it defines the points rather than being searched.
SEARCH = dict(
    lr=LogUniform(0.01, 1.0),                # paper: 0.3 (Conv6), 0.1 (ResNets)
    weight_decay=LogUniform(1e-5, 1e-3),     # paper: 1e-4 (Conv6), 5e-4 (ResNets)
    rerand_freq=QUniform(50, 1000, 50),      # K_per, paper: 300
)


def _experiment(network: str, model: str, p: float, lr: float, wd: float) -> Experiment:
    return Experiment(
        name=f"figure1_{network}_ku_iterand",
        config=dict(**CIFAR10, **ITERAND_KU, model=model, conv_sparsity=p, lr=lr, weight_decay=wd),
        grid=dict(rerand_lambda=R_VALUES, seed=SEEDS),
        search=SEARCH,
    )


EXPERIMENTS = [
    _experiment("conv6", "conv6x1.0", p=0.5, lr=0.3, wd=1e-4),
    _experiment("resnet18", "resnet18x1.0", p=0.6, lr=0.1, wd=5e-4),
    _experiment("resnet34", "resnet34x1.0", p=0.6, lr=0.1, wd=5e-4),
]
