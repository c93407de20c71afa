"""The paths of a batch-norm call, one file each; :func:`..ops.choose_path` picks one.

- :mod:`.inference`: eval with running statistics.
- :mod:`.native_local`: training without synchronisation, torch's own kernel.
- :mod:`.composed`: synchronised training on any device and under torch.compile.
- :mod:`.cuda_sync`: synchronised eager training on CUDA, torch's sync-batch-norm kernels with
  the O(C) glue in :mod:`.cuda_glue` (Triton).

Each path takes the checked arguments and returns ``(output, new_state)``, finishing its own
state update: into ``state``'s tensors when ``in_place`` (a layer's buffers), else into new ones.
"""
