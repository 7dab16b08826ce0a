"""``longmem serve``: an OpenAI-compatible HTTP server over a LongMem model, with named memories per API key.

``create_app(Engine(model, tokenizer, store_dir, model_id), api_keys)`` builds the FastAPI app; the
command line (``longmem.cli.serve``) loads the model and runs it under uvicorn. Needs the ``serve``
extra: ``pip install 'longmem[serve]'``.
"""

from longmem.serve.app import create_app
from longmem.serve.engine import Engine, Limits
from longmem.serve.errors import APIError
from longmem.serve.keys import read_api_keys

__all__ = ["APIError", "Engine", "Limits", "create_app", "read_api_keys"]
