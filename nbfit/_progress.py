"""Progress bars over gene chunks and solver stages (tqdm).

``progress=None`` means: on in a terminal (stderr is a tty) or a Jupyter notebook, off
otherwise (logs, pipes, CI: the ``CI`` environment variable is set). ``NBFIT_PROGRESS=0``
or ``1`` overrides the automatic choice.
"""

from __future__ import annotations

import contextlib
import os
import sys

from nbfit._strategy import STRATEGIES


def enabled(progress):
    """Whether to show a progress bar for ``progress`` (True, False or None = automatic)."""
    if progress is not None:
        return bool(progress)
    setting = os.environ.get("NBFIT_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return False
    if _in_notebook():
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def _in_notebook():
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _bar_class():
    """tqdm's notebook bar in a notebook with ipywidgets, else its text bar (on stderr)."""
    if _in_notebook():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm

            return tqdm
        except ImportError:
            pass
    from tqdm import tqdm

    return tqdm


def n_stages(training_strategy, quick_scale=False):
    """Number of ``train`` calls of a named or list strategy; None for a callable."""
    if isinstance(training_strategy, str):
        stages = len(STRATEGIES.get(training_strategy.upper(), [None]))
        return 3 * stages if quick_scale else stages
    if isinstance(training_strategy, (list, tuple)):
        return len(training_strategy)
    return None


class Bar:
    """A progress bar in chunks; ``update`` and ``describe`` are no-ops when disabled."""

    def __init__(self, show, total, unit="chunk", desc="nbfit"):
        self._bar = None
        if show:
            self._bar = _bar_class()(
                total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True,
                leave=True, smoothing=0.1,
            )

    def set_total(self, total):
        if self._bar is not None and total != self._bar.total:
            self._bar.total = total
            self._bar.refresh()

    def describe(self, text):
        if self._bar is not None:
            self._bar.set_description_str(text, refresh=True)

    def update(self, n=1):
        if self._bar is not None:
            self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StageProgress:
    """The ``Estimator.on_chunk`` hook: one bar over (stages x gene chunks).

    A stage starts when its first chunk (``start == 0``) is reported; with a callable
    strategy (stage count unknown) the total grows by one stage's chunks at each stage.
    """

    def __init__(self, show, n_chunks, stages=None):
        self.n_chunks = n_chunks
        self.stages = stages
        self.stage = 0
        total = n_chunks * stages if stages else n_chunks
        self.bar = Bar(show, total, desc="nbfit")

    def __call__(self, method, start, stop):
        if start == 0:
            self.stage += 1
            if not self.stages or self.stage > self.stages:
                self.bar.set_total(self.n_chunks * self.stage)
            of = f"/{self.stages}" if self.stages else ""
            self.bar.describe(f"nbfit stage {self.stage}{of} {method}")
        self.bar.update(1)

    def close(self):
        self.bar.close()


@contextlib.contextmanager
def track(estimator, progress, training_strategy, quick_scale=False):
    """Show a bar over the chunks and stages of ``estimator``'s training, in this block."""
    if not enabled(progress):
        yield
        return
    n_chunks = -(-len(estimator.gene_names) // estimator.batch_size)
    hook = StageProgress(True, n_chunks, n_stages(training_strategy, quick_scale))
    estimator.on_chunk = hook
    try:
        yield
    finally:
        hook.close()
        del estimator.on_chunk
