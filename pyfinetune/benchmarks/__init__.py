"""pyfinetune's benchmarks, shipped with the package so that ``pyfinetune bench`` runs anywhere.

* :mod:`.common`: interleaved timing, percentiles, CPU-contention check, machine description, records.
* :mod:`.optim`, :mod:`.distill`, :mod:`.prune`, :mod:`.semi_structured`: one module per op, its cases,
  contenders and report; ``main(argv)`` is the command line of ``benchmarks/bench_<op>.py`` in a clone
  (also ``python -m pyfinetune.benchmarks.<op>``).
* :mod:`.model_shapes`: parameter shapes of real models.

The submodules import nothing heavy until used; import the one you need.
"""
