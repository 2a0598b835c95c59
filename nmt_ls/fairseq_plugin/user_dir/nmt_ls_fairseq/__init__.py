"""The ``fairseq-train --user-dir`` entry point: registers nmt_ls's criteria with fairseq."""

import nmt_ls.fairseq_plugin.criterions  # noqa: F401
