"""``python -m han_surgery.finetune`` and ``accelerate launch -m han_surgery.finetune``."""

import sys

from .train import main

sys.exit(main())
