"""The package's layers, as README's "Read the code in this order" lists them and as its folders lay them out:
the core's modules at the top of bloom/, then one subpackage per layer. Every module sits in its layer's folder,
and imports only from its own layer or the layers above it."""

import ast
from pathlib import Path

import bloom

LAYERS = {
    "core": ["config", "matvec", "model", "kv_cache", "memory"],
    "scale": ["quantize", "parallel"],
    "checkpoints": ["loader", "hub", "tokenizer"],
    "generation": ["decode_step", "decoder", "generate", "streaming"],
    "research": ["probe", "lens", "weights", "attribution", "patching", "activations", "perplexity", "evaluation",
                 "viz", "page"],
    "command_line": ["cli", "arguments", "bench"],
}  # fmt: skip
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}
PACKAGE = Path(bloom.__file__).parent


def layer_of(path: Path) -> str:
    """The layer of a module of the package: its folder's name, "core" for bloom/ itself."""
    folder = path.parent.relative_to(PACKAGE)
    return "core" if folder == Path(".") else folder.parts[0]


def imported_layers(path: Path) -> set[str]:
    """The layers a module imports from, by the bloom modules its imports name."""
    module_layer = {module: layer for layer, modules in LAYERS.items() for module in modules}
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bloom":
            modules |= {*node.module.split(".")[1:], *(alias.name for alias in node.names)}
        elif isinstance(node, ast.Import):
            modules |= {
                part for alias in node.names if alias.name.startswith("bloom.") for part in alias.name.split(".")
            }
    return {module_layer[m] for m in modules if m in module_layer} | {m for m in modules if m in LAYERS}


def test_every_module_sits_in_its_layers_folder():
    found = {path.stem: layer_of(path) for path in PACKAGE.rglob("*.py") if not path.stem.startswith("__")}
    expected = {module: layer for layer, modules in LAYERS.items() for module in modules}
    assert found == expected


def test_every_module_imports_only_from_its_layer_or_above():
    wrong = [
        f"{path.relative_to(PACKAGE)} ({layer_of(path)}) imports from {layer}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" or path.parent != PACKAGE  # bloom/__init__.py re-exports every layer's names
        for layer in imported_layers(path)
        if path.stem != "__main__" and RANK[layer] > RANK[layer_of(path)]
    ]
    assert not wrong


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "model.py"
    module.write_text("from bloom.generation.decoder import Decoder\nfrom bloom import matvec\n", encoding="utf-8")
    assert imported_layers(module) == {"generation", "core"}
