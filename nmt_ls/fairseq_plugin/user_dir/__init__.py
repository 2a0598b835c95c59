# Makes this folder a package only so that setuptools ships nmt_ls_fairseq/ in the wheel;
# fairseq puts this folder on sys.path and imports nmt_ls_fairseq from it.
