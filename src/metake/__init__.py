"""metake: locate-then-edit knowledge editing (MEMIT, with MetaKE's solver-aware planner to come).

Quick use::

    from metake import Editor, load_model
    model, tok = load_model("smollm2-135m")
    editor = Editor(model, tok, method="memit")
    result = editor.edit([{"prompt": "{} is located in the city of",
                           "subject": "The Eiffel Tower", "target_new": "Rome"}])
    editor.restore()
"""

__version__ = "0.1.0"

from metake.editor import Editor, EditReport, EditResult  # noqa: E402
from metake.errors import (  # noqa: E402
    InvalidRequestError,
    MetakeError,
    ModelNotAvailableError,
    UnsupportedModelError,
)
from metake.hparams import MemitHparams, memit_hparams  # noqa: E402
from metake.models import get_adapter, load_model  # noqa: E402
from metake.requests import EditRequest, load_requests, parse_requests  # noqa: E402

__all__ = [
    "EditReport",
    "EditRequest",
    "EditResult",
    "Editor",
    "InvalidRequestError",
    "MemitHparams",
    "MetakeError",
    "ModelNotAvailableError",
    "UnsupportedModelError",
    "get_adapter",
    "load_model",
    "load_requests",
    "memit_hparams",
    "parse_requests",
    "__version__",
]
