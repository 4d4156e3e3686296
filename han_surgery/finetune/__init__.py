"""Fine-tuning with accelerate: ``han-surgery finetune`` / ``python -m han_surgery.finetune``.

* :mod:`.args` -- the command-line options (shared by both entry points).
* :mod:`.data` -- image folders, ``.npz`` images, numeric CSVs, text CSV/JSONL.
* :mod:`.models` -- resolving ``--model``; saving / loading the output folder in its library's format.
* :mod:`.train` -- the accelerate loop (1..N processes, mixed precision, exact resume).
* :mod:`.hub` -- the model card and the upload to the Hugging Face Hub.
"""

from .data import DataBundle, DataError, load_data
from .models import ModelError, build_model, load_model, save_model
from .train import FinetuneError, main, run

__all__ = [
    "DataBundle",
    "DataError",
    "FinetuneError",
    "ModelError",
    "build_model",
    "load_data",
    "load_model",
    "main",
    "run",
    "save_model",
]
