"""The paper code's three single-run examples: ResNet18 on CIFAR-10, seed 1, 100 epochs.
SGD (KU, wd 5e-4), edge-popup (SC, p 0.6) and IteRand (SC, p 0.6, K_per 300, r 0.1): 3 trials.
Compute: about 0.5 GPU-hours (an estimate from forward FLOPs at 25 TFLOP/s, not a measurement).
    python -m iterand_tune experiments/examples.py --only cifar10_resnet18_sc_iterand
"""
from iterand_tune.experiments import Experiment

RESNET18_CIFAR10 = dict(
    dataset="cifar10",
    model="resnet18",
    epochs=100,
    batch_size=128,
    optimizer="SGD",
    lr=0.1,
    lr_scheduler="CustomCosineLR",
    padding_before_crop=True,
    weight_decay=5e-4,
    seed=1,
)
SC_PRUNING = dict(train_mode="score_only", bn_affine=False, init_mode="signed_constant",
                  conv_sparsity=0.6)

EXPERIMENTS = [
    Experiment("cifar10_resnet18_ku_sgd",
               dict(**RESNET18_CIFAR10, train_mode="normal", init_mode="kaiming_uniform")),
    Experiment("cifar10_resnet18_sc_edgepopup", dict(**RESNET18_CIFAR10, **SC_PRUNING)),
    Experiment("cifar10_resnet18_sc_iterand",
               dict(**RESNET18_CIFAR10, **SC_PRUNING, rerand_mode="bernoulli", rerand_freq=300,
                    rerand_lambda=0.1)),
]
