"""wdstudy: compare L2 regularization with decoupled weight decay.

``wdstudy.load_results(spec_or_storage)`` gives a study's trials, evaluations and comparison
as pandas DataFrames (:mod:`wdstudy.results`); it is loaded on first use, so that
``import wdstudy`` stays light for the launcher.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("load_results", "Results"):
        from . import results

        return getattr(results, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
