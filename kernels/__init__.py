"""Pure array kernels: no files, no globals, no Dask. Installed as ooc_universal.kernels."""
