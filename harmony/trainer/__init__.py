"""The trainer: the loop (``loop``: ``Trainer``, ``main``) and what it drives or observes.

``contracts`` (what the parts must provide), ``monitor`` (noise detection, an observer), ``window`` (the metrics
window), ``evaluate`` (retrieval, probe, noise AUC), ``metrics`` and ``plots`` (outputs), ``checkpoint``,
``rundir``, ``runlock``, ``preempt`` and ``inputs`` (the run folder and its safety), ``profiling``, ``optim`` and
``schedule`` (optimiser and learning-rate schedule).
"""
__all__ = ["Trainer", "main"]


def __getattr__(name: str):
    """``Trainer`` and ``main`` from ``loop``, imported when first asked for: the trainer's own modules (e.g.
    ``evaluate``, which the audit reads) import without the loop and everything it drives."""
    if name in __all__:
        from harmony.trainer import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'harmony.trainer' has no attribute {name!r}")
