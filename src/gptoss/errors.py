"""Exception types. Each message names the file, tensor, field or parameter at fault."""


class GptOssError(Exception):
    """Base class for every error gptoss raises on purpose."""


class ConfigError(GptOssError, ValueError):
    """A config field is missing, of the wrong type, or out of range."""


class CheckpointError(GptOssError, ValueError):
    """A checkpoint file or tensor is missing, truncated, of the wrong shape or dtype."""


class MXFP4Error(GptOssError, ValueError):
    """Values that MXFP4 cannot represent (NaN, inf) or malformed blocks/scales."""


class GenerationError(GptOssError, ValueError):
    """A bad sampling parameter, an empty prompt, or a request beyond the context limit."""
