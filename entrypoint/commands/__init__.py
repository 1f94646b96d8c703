"""``podtrain``'s commands other than ``run``: ``pull``/``push`` (:mod:`~entrypoint.commands.data`), ``record``,
``checkpoints list|verify`` and ``smoke``. ``run`` itself is :mod:`entrypoint.cli` with the supervisor.
"""
