"""Figure 3 of the paper: ImageNet. SGD on ResNet18 and ResNet34; edge-popup and IteRand
(K_per = 1000, r = 0.1) with SC weights and p = 0.7 on ResNet34, ResNet50 and ResNet101.
Seed 1, 105 epochs (5 warm-up, 5 fine-tuning at lr 1e-5): 8 trials. The paper ran ResNet50/101
on 2 GPUs, each normalising its half of the batch; here each trial has one GPU, and those two
normalise each half of the batch on its own (bn_splits=2), the same computation (docs/method.md
section 4). On CUDA the JPEGs are decoded and cropped on the GPU (imagenet_decode).
Compute: about 330 GPU-hours (an estimate from forward FLOPs at 25 TFLOP/s sustained, not a
measurement; `benchmarks/gpu_check.py` measures ResNet50's and ResNet101's trials, docs/gpu.md).
Needs the ImageNet train/ and val/ folders under --data-dir (they cannot be downloaded).
    python -m iterand_tune experiments/figure3.py --data-dir /path/to/imagenet
Hyperparameter search (`--search`): lr and weight decay for every trial, K_per and r for IteRand
(p stays 0.7, as in the paper); one ImageNet trial costs tens of GPU-hours, so budget with care.
"""
from iterand_tune.experiments import Experiment
from iterand_tune.search_space import LogUniform, QUniform

IMAGENET = dict(
    dataset="imagenet",
    dataset_download=False,      # ImageNet has to be fetched by hand
    num_workers=8,               # DataLoader workers decoding JPEGs
    epochs=105,
    batch_size=128,
    optimizer="SGD",
    sgd_momentum=0.9,
    weight_decay=1e-4,
    lr=0.1,
    lr_scheduler="CustomCosineLR",
    warmup_epochs=5,             # lr * (e + 1) / 5 for the first five epochs
    finetuning_epochs=5,         # the last five epochs at finetuning_lr
    finetuning_lr=1e-5,
    padding_before_crop=False,
)

SC_PRUNING = dict(train_mode="score_only", bn_affine=False, init_mode="signed_constant",
                  conv_sparsity=0.7)
ITERAND = dict(rerand_mode="bernoulli", rerand_freq=1000, rerand_lambda=0.1)
# ResNet50/101: the paper's two GPUs, each with half of the batch, as one GPU computing BatchNorm
# over each half.
TWO_HALVES = dict(bn_splits=2)

# --search spaces around the paper's values (lr 0.1, weight decay 1e-4, K_per 1000, r 0.1).
SEARCH = dict(lr=LogUniform(0.01, 1.0), weight_decay=LogUniform(1e-5, 1e-3))
ITERAND_SEARCH = dict(**SEARCH, rerand_freq=QUniform(200, 3000, 100),
                      rerand_lambda=LogUniform(0.01, 1.0))

EXPERIMENTS = [
    Experiment("figure3_resnet18_ku_sgd", dict(**IMAGENET, model="resnet18"), dict(seed=[1]),
               search=SEARCH),
    Experiment("figure3_resnet34_ku_sgd", dict(**IMAGENET, model="resnet34"), dict(seed=[1]),
               search=SEARCH),
    Experiment("figure3_resnet34_sc_edgepopup", dict(**IMAGENET, **SC_PRUNING, model="resnet34"),
               dict(seed=[1]), search=SEARCH),
    Experiment("figure3_resnet50_sc_edgepopup",
               dict(**IMAGENET, **SC_PRUNING, **TWO_HALVES, model="resnet50"), dict(seed=[1]),
               gpus_per_trial=1, search=SEARCH),
    Experiment("figure3_resnet101_sc_edgepopup",
               dict(**IMAGENET, **SC_PRUNING, **TWO_HALVES, model="resnet101"), dict(seed=[1]),
               gpus_per_trial=1, search=SEARCH),
    Experiment("figure3_resnet34_sc_iterand",
               dict(**IMAGENET, **SC_PRUNING, **ITERAND, model="resnet34"), dict(seed=[1]),
               search=ITERAND_SEARCH),
    Experiment("figure3_resnet50_sc_iterand",
               dict(**IMAGENET, **SC_PRUNING, **ITERAND, **TWO_HALVES, model="resnet50"),
               dict(seed=[1]), gpus_per_trial=1, search=ITERAND_SEARCH),
    Experiment("figure3_resnet101_sc_iterand",
               dict(**IMAGENET, **SC_PRUNING, **ITERAND, **TWO_HALVES, model="resnet101"),
               dict(seed=[1]), gpus_per_trial=1, search=ITERAND_SEARCH),
]
