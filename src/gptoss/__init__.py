"""gptoss: OpenAI's GPT-oss, exact and fast on commodity hardware."""

from .checkpoint import convert, load, save
from .config import PRESETS, ModelConfig, preset
from .errors import CheckpointError, ConfigError, GptOssError, MXFP4Error
from .model import Transformer

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "load", "save", "convert",
           "GptOssError", "ConfigError", "CheckpointError", "MXFP4Error", "__version__"]
