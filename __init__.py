"""rglf: offline RGLF feedback scoring, SQL rankings and decoupled router training (AVG-LLaVA).

The installed package maps the repository's folders: ``rglf.model`` (the paper's concepts),
``rglf.model.toy`` (the embedded default), ``rglf.pipeline`` (scoring job + SQL),
``rglf.router`` (trainer, evaluation, routing) and ``rglf.cli`` (the ``rglf`` command).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rglf")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
