"""What the tests, the benchmarks and the offline demo build on; not part of the installed package.

:mod:`testing.tiny` makes tiny random backbones from configs; :mod:`testing.reference` holds the original's
decoders and forward, the slow oracle the fast code is held against. The checkout's root must be on
``sys.path``: pytest puts it there (pyproject's ``pythonpath``), ``python -m demo.shapes`` runs from it, and
each bench script that imports from here adds it.
"""
