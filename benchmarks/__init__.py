"""Microbenchmarks of mgc_kernels' ops against the alternatives a user has.

Run ``python -m benchmarks --help``. The pieces, one place for each thing:

- ``cases``     what is measured: inputs per size, the library op, FLOP/byte counts
- ``formulas``  the plain-PyTorch baselines a user would write (``naive``, ``torch_compile``)
- ``providers`` which implementation runs a case, or why it is skipped
- ``measure``   timing (CUDA events or ``perf_counter``) and peak extra memory
- ``device``    device names and their published peak throughput
- ``results``   result rows, the JSON-lines file and the printed table
- ``cli``       the command line that ties them together; ``plot`` draws the results
"""
