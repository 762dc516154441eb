"""The package's layers, as README's "Read the code in this order" lists them and as its folders lay them out:
the core's modules at the top of bloom/, then one subpackage per layer. Every module sits in its layer's folder,
and imports only from its own layer or the layers above it."""

import ast
from pathlib import Path

import bloom

LAYERS = {
    "core": ["config", "heap", "matvec", "model", "kv_cache", "memory"],
    "scale": ["quantize", "parallel"],
    "checkpoints": ["loader", "hub", "tokenizer"],
    "generation": ["decode_step", "decoder", "generate", "streaming"],
    "research": ["probe", "lens", "weights", "attribution", "patching", "head_scores", "activations", "perplexity",
                 "evaluation", "viz", "page"],
    "command_line": ["cli", "arguments", "bench"],
}  # fmt: skip
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}
PACKAGE = Path(bloom.__file__).parent


def layer_of(path: Path) -> str:
    """The layer of a module of the package: its folder's name, "core" for bloom/ itself."""
    folder = path.parent.relative_to(PACKAGE)
    return "core" if folder == Path(".") else folder.parts[0]


def imported_layers(path: Path, source: str | None = None) -> set[str]:
    """The layers the module at `path` (its `source`, or the file's) imports from: the bloom modules its imports name
    (relative imports resolved against its package), and the modules of the names bloom re-exports."""
    module_layer = {module: layer for layer, modules in LAYERS.items() for module in modules}
    package = ["bloom", *path.parent.relative_to(PACKAGE).parts]
    dotted = []  # each import as the dotted names it reaches: "bloom.generation.decoder.Decoder"
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            dotted += [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            dotted += [alias.name for alias in node.names]
    layers = set()
    for name in dotted:
        parts = name.split(".")
        if parts[0] != "bloom":
            continue
        if len(parts) == 2 and parts[1] in bloom.__all__:  # `from bloom import record`: where record lives
            parts = getattr(bloom, parts[1]).__module__.split(".")
        layers |= {module_layer[part] for part in parts[1:] if part in module_layer}
        layers |= {part for part in parts[1:] if part in LAYERS}
    return layers


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


def test_the_check_sees_every_form_of_an_upward_import():
    imports = {
        "from bloom.generation.decoder import Decoder": {"generation"},
        "import bloom.research.probe": {"research"},
        "from bloom import matvec": {"core"},
        "from bloom import record": {"research"},  # re-exported by bloom, defined in research/probe.py
        "from ..research import probe": {"research"},  # relative, from a module of bloom/scale/
        "from .quantize import Int8Linear": {"scale"},
    }
    for line, layers in imports.items():
        module = PACKAGE / "scale" / "parallel.py"  # where the import is pretended to be: only its folder is read
        assert imported_layers(module, line) == layers, line
