"""The package's layers, as README's "Read the code in this order" lists them: each module imports only
from its own layer or the layers above it, and every module has a layer."""

import ast
from pathlib import Path

import bloom

LAYERS = {
    "core": ["config", "matvec", "model", "kv_cache", "memory"],
    "scale": ["quantize", "parallel"],
    "checkpoints": ["loader", "hub", "tokenizer"],
    "generation": ["decode_step", "decoder", "generate", "streaming"],
    "research tools": ["probe", "lens", "weights", "attribution", "patching", "activations", "perplexity",
                       "evaluation", "viz", "page"],
    "command line": ["cli", "arguments", "bench", "__main__", "__init__"],
}  # fmt: skip
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def imported_bloom_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "bloom":
            names |= {alias.name for alias in node.names if alias.name in RANK}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bloom."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("bloom.")}
    return names


def test_every_module_imports_only_from_its_layer_or_above():
    package = Path(bloom.__file__).parent
    modules = {path.stem: path for path in package.glob("*.py")}
    assert set(modules) == set(RANK), "a module without a layer, or a layer naming no module"
    wrong = [
        f"{name} imports {dep}"
        for name, path in modules.items()
        for dep in imported_bloom_modules(path)
        if RANK[dep] > RANK[name]
    ]
    assert not wrong
