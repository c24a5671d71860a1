"""The house rules of the tree (#12), checked on the source so they stay true: the shared layer imports no
stage, inference imports no step-3 trainer module, modules stay small, functions stay short, and the
README's architecture section names every module."""
import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("step1_sft", "step2_reward_model", "step2_dpo", "step3_rlhf")
STEP3_TRAINING = ("step3_rlhf.trainer", "step3_rlhf.loop", "step3_rlhf.experience_maker", "step3_rlhf.engines")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def python_files(*tops):
    for top in tops:
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(root, name), REPO)


def imported_modules(path):
    tree = ast.parse(open(os.path.join(REPO, path), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def test_shared_layer_imports_no_stage():
    bad = [(p, m) for p in python_files("utils") for m in imported_modules(p) if m.split(".")[0] in STAGES]
    assert not bad, f"utils/ must not import a stage: {bad}"


def test_inference_imports_no_step3_training_module():
    bad = [(p, m) for p in python_files("inference") for m in imported_modules(p)
           if m.startswith(STEP3_TRAINING)]
    assert not bad, f"inference/ must not import step-3 training modules: {bad}"


PRODUCT = ("utils", "inference", "step1_sft", "step2_reward_model", "step2_dpo", "step3_rlhf")


def test_modules_stay_small():
    big = {p: n for p in python_files(*PRODUCT, "bench")
           if (n := sum(1 for _ in open(os.path.join(REPO, p), encoding="utf-8"))) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_functions_stay_short():
    long = []
    for p in python_files(*PRODUCT):
        tree = ast.parse(open(os.path.join(REPO, p), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_readme_architecture_names_every_module():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    missing = []
    for p in python_files(*PRODUCT):
        name = os.path.basename(p)
        if name == "__init__.py":
            continue
        stem = name[:-3]
        if not re.search(rf"\b{re.escape(stem)}(\.py)?\b", section):
            missing.append(p)
    assert not missing, f"README architecture section does not name: {missing}"
