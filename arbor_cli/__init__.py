"""arbor: run Llama-family language models locally; long documents sized to the machine.

    import arbor_cli
    m = arbor_cli.load("smollm2-135m-instruct")
    print(m.chat([{"role": "user", "content": "What is the capital of France?"}]).text)
"""

from arbor_core.config import ArborConfig
from arbor_core.errors import ArborError

from .generate import GenerationResult, GenerationStream
from .loading import load
from .model import Model

__version__ = "0.1.0"
__all__ = ["load", "Model", "ArborConfig", "ArborError", "GenerationResult", "GenerationStream", "__version__"]
