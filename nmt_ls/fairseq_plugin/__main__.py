"""``python -m nmt_ls.fairseq_plugin`` prints the directory to pass to ``fairseq-train --user-dir``."""

from nmt_ls.fairseq_plugin import USER_DIR

print(USER_DIR)
