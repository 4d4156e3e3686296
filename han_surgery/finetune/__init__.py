"""Fine-tuning with accelerate, as a Python API: ``run(FinetuneConfig(...)) -> FinetuneResult``.

``han-surgery finetune`` and ``python -m han_surgery.finetune`` (also under ``accelerate launch``)
build a :class:`FinetuneConfig` from their flags and call :func:`run`.

* :mod:`.config` -- :class:`FinetuneConfig` (every option, typed and validated) and :class:`FinetuneResult`.
* :mod:`.runner` -- :func:`run` and its steps (data, model, loaders, optimisation, trackers, resume, loop, export).
* :mod:`.data` -- image folders, ``.npz`` images, numeric CSVs, text CSV/JSONL.
* :mod:`.models` -- resolving ``--model`` for the data; saving in the model library's format.
* :mod:`.loop` -- losses, evaluation, the accelerate loop (1..N processes, mixed precision, exact resume).
* :mod:`.checkpoints`, :mod:`.tracking` -- the output folder, checkpoints and resume; ``metrics.jsonl``.
* :mod:`.hub` -- the model card and the upload to the Hugging Face Hub.

Example::

    from han_surgery import HanConfig
    from han_surgery.finetune import FinetuneConfig, run

    result = run(FinetuneConfig(model="vit_tiny_patch16_224", data="digits.npz", output_dir="out",
                                hanify=HanConfig(), epochs=3, lr=3e-4))
    print(result.metrics["eval_accuracy"], result.params, "parameters")
"""

from .checkpoints import FinetuneError
from .config import FinetuneConfig, FinetuneResult
from .data import DataBundle, DataError, load_data
from .hub import HubUploadError, push_folder
from .models import BuiltModel, ModelError, build_model, save_model
from .runner import run

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "run",
    "DataBundle",
    "DataError",
    "FinetuneError",
    "HubUploadError",
    "ModelError",
    "BuiltModel",
    "build_model",
    "load_data",
    "push_folder",
    "save_model",
]
