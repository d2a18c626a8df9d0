"""``make demo``: example 1 at its default size.

Trains the MLP regression of ``examples/exploding_regression.py`` with Adam
(no clipping, ``clip_by_global_norm``, ``clip_by_norm``, ``clip_by_value``) and
the exploding variant (data scaled up, SGD with momentum), prints the results
table and the path of the loss-curve plot. Pass ``--tiny`` or ``--full`` to
change the size, ``--out DIR`` to choose where the plot goes.
"""

from __future__ import annotations

import sys

from exploding_regression import main

if __name__ == "__main__":
    main(sys.argv[1:])
