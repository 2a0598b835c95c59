"""nmt_ls's label-smoothed criteria as a fairseq plugin (``--user-dir``).

fairseq imports a user dir by its basename, as a top-level module, and leaves the dir's parent
on ``sys.path``. So the dir is :data:`USER_DIR`, a one-line package alone in its parent folder
(nothing of nmt_ls becomes importable under a bare name), and it imports
:mod:`nmt_ls.fairseq_plugin.criterions`, where the criteria are registered once under their
real module name. Importing this package does not import fairseq::

    pip install cython && pip install --no-build-isolation "nmt_ls[fairseq]"
    fairseq-train DATA_BIN --user-dir "$(python -m nmt_ls.fairseq_plugin)" \\
        --criterion nmt_ls_label_smoothed --label-smoothing 0.1 --smoothing others ...

Criteria: ``nmt_ls_label_smoothed`` (smoothed cross-entropy, ``--smoothing others`` by default,
fairseq's own distribution) and ``nmt_ls_label_smoothed_kl`` (its KL form, ``others_no_pad`` by
default, OpenNMT-py's distribution).
"""

import os

USER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "user_dir", "nmt_ls_fairseq")
