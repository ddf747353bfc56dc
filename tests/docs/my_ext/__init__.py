"""The extending guide's worked examples: a task, a dataset, a strategy, a decoder and a backbone.

Each module is one file of the guide (docs/extending.md shows them verbatim); the configs that
use them are under ``tests/docs/conf/``. ``tests/docs/test_extending.py`` trains and evaluates
them together.
"""
