"""The package's layers, read from the source with `ast`: imports between iterand_tune's modules
run one way down LAYERS, imports inside functions are the few optional heavy dependencies (each
with a comment saying why), the training core imports without Ray or HyperOpt, and the analysis
package uses only the torch-free part of iterand_tune."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "iterand_tune")

# Lowest first: a module may import only modules before it. `data` is a package (data/*),
# whose modules may also import each other. `__main__` sits on top of everything.
LAYERS = ("vocabulary", "gpu_shares", "config", "supermask", "models", "data", "training",
          "trial_setup", "storage", "ray_assumptions", "runs", "terminal", "resources",
          "search_space", "experiments", "search_plan", "tracking", "tune", "search", "cli",
          "__main__")
# Shared by both command lines and the analysis package: the run reader and what it stands on.
LEAVES = {"storage": {"vocabulary"}, "terminal": {"vocabulary"}, "vocabulary": set(),
          "ray_assumptions": {"storage"}, "runs": {"storage", "ray_assumptions", "vocabulary"}}

# Imports inside functions: (module, imported name) -> why (each line also says so in a comment).
LATE_IMPORTS = {
    ("data.readers", "sklearn.datasets.load_digits"): "a slow import, only if sklearn moved its digits file",
    ("data.readers", "torchvision.datasets"): "a slow import (about 2 s), only for files on disk",
    ("data.readers", "torchvision.datasets.utils"): "the same package",
    ("data.augment", "torchvision.transforms"): "the same slow import, only for ImageNet",
    ("data.jpeg", "torchvision.io.ImageReadMode"): "the same slow import, only for ImageNet's JPEGs",
    ("data.jpeg", "torchvision.io.decode_jpeg"): "the same",
    ("resources", "iterand_tune.models.estimate_macs"): "torch: --help and --dry-run need no GPU share",
    ("resources", "ray"): "a GPU machine without Ray still uses gpu_share and the checks",
    ("resources", "ray.util.scheduling_strategies"): "the same; a submodule ray does not load",
    ("search_space", "ray.tune"): "experiment files load without Ray",
    ("experiments", "yaml"): "PyYAML: only for the original YAML configs; a GPU box may lack it",
    ("tracking", "ray.tune.logger.mlflow.MLflowLoggerCallback"): "imports mlflow: only with --mlflow",
    ("tracking", "mlflow.tracking.MlflowClient"): "mlflow is optional",
    ("tracking", "ray.tune.logger.wandb.WandbLoggerCallback"): "imports wandb: only with --wandb",
    ("ray_assumptions", "ray.train.constants._get_ray_train_session_dir"): "Ray's private API, one function",
    ("cli", "iterand_tune.training.Trainer"): "torch: only `train` trains, not its --help",
    ("cli", "iterand_tune.data.DataError"): "torch: only a trial or a started run reads data",
    ("cli", "iterand_tune.tune"): "train, --help and --dry-run work without Ray",
    ("cli", "analysis.report.REPORT_FILE"): "--report: pandas and matplotlib only when asked for",
    ("cli", "analysis.report.build_report"): "the same",
    ("cli", "analysis.results.write_bytes"): "the same package",
    ("cli", "iterand_tune.search"): "only a search needs Ray Tune's searchers and HyperOpt",
}
# What the analysis package may use of iterand_tune.
ANALYSIS_USES = {"vocabulary", "storage", "terminal", "config", "runs", "ray_assumptions",
                 "search_plan", "experiments", "resources", "search_space", "gpu_shares"}


def _modules(root: str, package: str) -> dict[str, str]:
    """Dotted module name inside `package` (e.g. data.readers, data for its __init__) -> path."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts) or "__init__"] = path
    return out


MODULES = _modules(PACKAGE, "iterand_tune")


def _imports(module: str, path: str, package: str = "iterand_tune"):
    """(imported dotted name, ast node, inside a function) for every import of `path`; relative
    imports resolved against `module` (a dotted name inside `package`)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    here = [package, *([] if module == "__init__" else module.split("."))]
    if not is_package:
        here = here[:-1]  # the module's package

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child, in_function
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = here[:len(here) - (child.level - 1)]
                    base = ".".join([*parent, *([base] if base else [])])
                for alias in child.names:
                    yield f"{base}.{alias.name}", child, in_function
            yield from visit(child, inner)

    yield from visit(tree, False)


def _layer(name: str) -> str | None:
    """The layer of a dotted name imported from the package (iterand_tune.data.readers.X -> data;
    iterand_tune.config.TrialConfig -> config), or None for anything else."""
    parts = name.split(".")
    if parts[0] != "iterand_tune" or len(parts) < 2:
        return None
    return parts[1]


def _own_layer(module: str) -> str:
    return module.split(".")[0]


def test_every_module_has_a_layer():
    assert set(MODULES) - {"__init__"}, "no modules found"
    for module in MODULES:
        if module != "__init__":
            assert _own_layer(module) in LAYERS, f"iterand_tune/{module}: add it to LAYERS"


def test_imports_between_modules_run_one_way_down_the_layers():
    wrong = []
    for module, path in MODULES.items():
        if module == "__init__":
            continue
        mine = _own_layer(module)
        for name, node, _ in _imports(module, path):
            layer = _layer(name)
            if layer is None or layer == mine:
                continue
            if layer not in LAYERS or LAYERS.index(layer) >= LAYERS.index(mine):
                wrong.append(f"iterand_tune/{module} line {node.lineno} imports {layer} "
                             f"(a layer above or beside {mine})")
            elif mine in LEAVES and layer not in LEAVES[mine]:
                wrong.append(f"iterand_tune/{module} line {node.lineno} imports {layer} "
                             f"({mine} may import only {sorted(LEAVES[mine]) or 'nothing'})")
    assert not wrong, "\n".join(wrong)


def test_the_package_itself_imports_nothing():
    assert [name for name, _, _ in _imports("__init__", MODULES["__init__"])] == []


def _late_imports():
    """(module, imported name, node, source lines) of every import inside a function."""
    for module, path in sorted(MODULES.items()):
        with open(path) as f:
            lines = f.read().splitlines()
        for name, node, in_function in _imports(module, path):
            if in_function:
                yield module, name, node, lines


def test_imports_inside_functions_are_the_allowed_few_and_say_why():
    wrong, seen = [], set()
    for module, name, node, lines in _late_imports():
        seen.add((module, name))
        where = f"iterand_tune/{module} line {node.lineno}: {name}"
        if (module, name) not in LATE_IMPORTS:
            wrong.append(f"{where} is imported inside a function: import it at the top, or "
                         "add it to LATE_IMPORTS with the reason")
            continue
        text = lines[node.lineno - 1:node.end_lineno]
        if not any("#" in line and line.split("#", 1)[1].strip() for line in text):
            wrong.append(f"{where} needs a comment on its line saying why it is imported there")
    stale = sorted(set(LATE_IMPORTS) - seen)
    assert not wrong, "\n".join(wrong)
    assert not stale, f"LATE_IMPORTS entries no module has any more: {stale}"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.mark.slow  # a subprocess importing torch: a few seconds
def test_the_training_core_imports_without_ray_or_hyperopt():
    proc = _run("import sys\n"
                "sys.modules['ray'] = None\n"
                "sys.modules['hyperopt'] = None\n"
                "import iterand_tune.config, iterand_tune.vocabulary, iterand_tune.supermask, "
                "iterand_tune.models, iterand_tune.data, iterand_tune.training\n"
                "print('imported')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "imported"


def test_analysis_uses_only_the_torch_free_part_of_iterand_tune():
    wrong = []
    analysis = os.path.join(ROOT, "analysis")
    for module, path in _modules(analysis, "analysis").items():
        for name, node, _ in _imports(module, path, package="analysis"):
            layer = _layer(name)
            if name.split(".")[0] == "iterand_tune" and layer not in ANALYSIS_USES:
                wrong.append(f"analysis/{module} line {node.lineno} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_analysis_imports_without_torch_or_ray():
    proc = _run("import sys\n"
                "for name in ('ray', 'hyperopt', 'torch', 'torchvision'):\n"
                "    sys.modules[name] = None\n"
                "import analysis, analysis.cli\n"
                "print(sorted(m for m in sys.modules if m.startswith('iterand_tune.')))")
    assert proc.returncode == 0, proc.stderr
    used = {m.split(".")[1] for m in eval(proc.stdout)}
    assert used <= ANALYSIS_USES
