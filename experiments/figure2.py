"""Figure 2 of the paper: test accuracy against the number of parameters after pruning (CIFAR-10).

Conv6, ResNet18 and ResNet34 at widths {0.25, 0.5, 1.0, 2.0}; SGD (KU), edge-popup (KU, SC) and
IteRand (KU, SC; K_per = 300, r = 0.1); seeds 1-3; 100 epochs:
3 networks x 4 widths x 5 methods x 3 seeds = 180 trials.
Compute: about 46 GPU-hours (an estimate from forward FLOPs at 25 TFLOP/s sustained, not a
measurement; most of it is the x2.0 ResNets; small networks are overhead-bound and take longer
than their FLOPs say). Four trials of the small networks share one GPU.
    python -m iterand_tune experiments/figure2.py
Hyperparameter search (`--search`): one figure point per network, width and method, searching lr
and weight decay (all methods), p (pruning methods) and K_per and r (IteRand).
"""
from iterand_tune.experiments import Experiment
from iterand_tune.search_space import LogUniform, QUniform, Uniform

SEEDS = [1, 2, 3]
WIDTHS = ["0.25", "0.5", "1.0", "2.0"]

CIFAR10 = dict(
    dataset="cifar10",
    epochs=100,
    batch_size=128,
    optimizer="SGD",
    lr_scheduler="CustomCosineLR",  # cosine, stepped once per epoch, no warm-up
    padding_before_crop=True,       # pad 4 px before the random-resized crop
)

# The five methods of the figure. Edge-popup is IteRand with r = 0, as in the original configs.
METHODS = {
    "ku_sgd": dict(train_mode="normal", bn_affine=True, init_mode="kaiming_uniform"),
    "ku_edgepopup": dict(train_mode="score_only", bn_affine=False, init_mode="kaiming_uniform",
                         rerand_mode="bernoulli", rerand_freq=300, rerand_lambda=0.0),
    "sc_edgepopup": dict(train_mode="score_only", bn_affine=False, init_mode="signed_constant",
                         rerand_mode="bernoulli", rerand_freq=300, rerand_lambda=0.0),
    "ku_iterand": dict(train_mode="score_only", bn_affine=False, init_mode="kaiming_uniform",
                       rerand_mode="bernoulli", rerand_freq=300, rerand_lambda=0.1),
    "sc_iterand": dict(train_mode="score_only", bn_affine=False, init_mode="signed_constant",
                       rerand_mode="bernoulli", rerand_freq=300, rerand_lambda=0.1),
}

# Per network: sparsity p of the pruning methods, weight decay, and learning rates.
NETWORKS = {
    "conv6": dict(p=0.5, wd=1e-4, lr_pruning=0.3, lr_sgd=0.01),
    "resnet18": dict(p=0.6, wd=5e-4, lr_pruning=0.1, lr_sgd=0.1),
    "resnet34": dict(p=0.6, wd=5e-4, lr_pruning=0.1, lr_sgd=0.1),
}


# --search spaces. A searched p moves a point along the figure's parameter axis; the results
# record each trial's parameters after pruning, so the figure stays correct.
SGD_SEARCH = dict(lr=LogUniform(1e-3, 0.3), weight_decay=LogUniform(1e-5, 1e-3))
PRUNING_SEARCH = dict(lr=LogUniform(0.01, 1.0), weight_decay=LogUniform(1e-5, 1e-3),
                      conv_sparsity=Uniform(0.3, 0.8))
ITERAND_SEARCH = dict(**PRUNING_SEARCH, rerand_freq=QUniform(50, 1000, 50),  # K_per
                      rerand_lambda=LogUniform(0.01, 1.0))                    # r


def _search(method: str) -> dict:
    if method.endswith("sgd"):
        return SGD_SEARCH
    return ITERAND_SEARCH if method.endswith("iterand") else PRUNING_SEARCH


def _experiment(network: str, method: str) -> Experiment:
    n = NETWORKS[network]
    sgd = method.endswith("sgd")
    return Experiment(
        name=f"figure2_{network}_{method}",
        config=dict(**CIFAR10, **METHODS[method], weight_decay=n["wd"],
                    lr=n["lr_sgd"] if sgd else n["lr_pruning"],
                    **({} if sgd else dict(conv_sparsity=n["p"]))),
        grid=dict(model=[f"{network}x{w}" for w in WIDTHS], seed=SEEDS),
        search=_search(method),
    )


EXPERIMENTS = [_experiment(network, method) for network in NETWORKS for method in METHODS]
