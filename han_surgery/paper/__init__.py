"""Reproductions of the experiments of Yu & Zhang, "A Lightweight and Gradient-Stable Neural Layer".

One module per experiment, each with ``add_arguments(parser)`` and ``run(args) -> dict``,
driven by ``han-surgery paper <experiment> [--quick] [--out DIR]`` (see :mod:`.cli`):

* :mod:`.approximation` -- Section 3.2, Tables 1-2 (FC-1 and Han-3 fitting each other).
* :mod:`.checkerboard` -- Section 4, Table 3 (HanNet vs FCNet, the seven ablation rows).
* :mod:`.mnist_robustness` -- Section 5.1, Table 6 (clean, PGD and CW accuracy; TRADES and AT baselines).
* :mod:`.regression` -- Section 5.2, Table 9 (HanNet vs FCNet1/FCNet2 on any numeric CSV).
* :mod:`.han_mixer`, :mod:`.han_mobilevit` -- Sections 5.3-5.4, Tables 11-14 (on CIFAR or STL10
  folders, :mod:`.image_data`; training in :mod:`.vision`).

Shared pieces: model constructors (:func:`~.common.han_net`, :func:`~.common.fc_net`) and
:class:`~.common.PaperInputError` in :mod:`.common`; :mod:`.stacked` trains many runs of one
architecture as one batched computation; :mod:`.attacks`; :mod:`.activations` (GroupSort). Nothing
here reads data at import time; every data path is an argument.
"""

from .common import PaperInputError, count_parameters, fc_net, han_net

__all__ = ["PaperInputError", "count_parameters", "fc_net", "han_net"]
