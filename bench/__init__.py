"""Benchmarks for icbd-cache, run as ``icbd-bench COMMAND`` (see :mod:`bench.cli`).

- ``serve`` (:mod:`bench.serve`): fio's nbd engine and nbdcopy against icbd-cache, nbdkit and
  qemu-nbd serving the same page-cached raw image.
"""
