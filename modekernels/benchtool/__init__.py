"""``modekernels bench``: run the pytest-benchmark suites of ``bench/`` and work with their JSON.

- :mod:`~modekernels.benchtool.run`: choose suites, run each with pytest ``--benchmark-json``, add
  the run's metadata, write ``bench/results/<device>/<date>-<suite>.json`` as each suite ends,
  print ratios and fractions.
- :mod:`~modekernels.benchtool.compare`: two runs side by side, flagging cases more than 5% slower
  and cases missing from the new run.
- :mod:`~modekernels.benchtool.plot`: PNG charts per benchmark family with the measured limit.
- :mod:`~modekernels.benchtool.table`: the README's results table from committed GPU JSON.
- :mod:`~modekernels.benchtool.results`: reading a run's JSON (shared by the others).
"""
