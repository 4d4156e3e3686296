"""``python -m han_surgery.finetune ...`` and ``accelerate launch -m han_surgery.finetune ...``."""

import sys

from ..cli.finetune import main

sys.exit(main())
