"""Reproductions of the experiments of Yu & Zhang, "A Lightweight and Gradient-Stable Neural Layer".

One module per experiment, each with ``add_arguments(parser)`` and ``run(args) -> dict``,
driven by ``han-surgery paper <experiment> [--quick] [--out DIR]`` (see :mod:`.cli`):

* :mod:`.checkerboard` -- Section 4, Figure 1, Table 3 (HanNet vs FCNet, ablations).
* :mod:`.regression` -- Table 9 (HanNet vs FCNet1/FCNet2 on UCI/StatLib CSVs).
* :mod:`.mnist_robustness` -- Section 5.1, Table 6 (clean and PGD/CW robust accuracy).
* :mod:`.approximation` -- Section 3.2, Table 2 (FC-1 and Han-3 fitting each other).

Model constructors shared by all of them (:func:`~.common.han_net`, :func:`~.common.fc_net`)
live in :mod:`.common`. Nothing here reads data at import time; every data path is an argument.
"""

from .common import count_parameters, fc_net, han_net

__all__ = ["count_parameters", "fc_net", "han_net"]
