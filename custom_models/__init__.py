"""Own architectures that every script can build by name: each module in this folder is imported before a model is
built or rebuilt, so a ``@timm.models.register_model`` function in it makes ``--model_name <function name>`` work in
main.py, and lets inference, export and benchmark rebuild the run from its folder.

Add a file beside ``small_cnn.py`` (the worked example) and train with ``python main.py --model_name <name>
--pre_trained False``. The folder travels with the run's code: copy it wherever the run folder is used.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

logger = logging.getLogger(__name__)

_imported = False


def register_custom_models() -> None:
    """Import every module of this package once (their ``@register_model`` functions add themselves to timm)."""
    global _imported
    if _imported:
        return
    _imported = True
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
        logger.debug("custom models: imported %s", module.name)
