"""podtrain inside the training frameworks people already use: one import, their own trainer, podtrain's guarantees.

Each framework is a submodule imported by name (``from sdk.integrations import transformers as podtrain_hf``) and
nothing here imports one: ``import sdk`` and ``import sdk.integrations`` never load a framework, which is an
optional extra (``pip install 'podtrain[transformers]'``, ``'podtrain[lightning]'``).
"""

from __future__ import annotations

__all__: list[str] = []
