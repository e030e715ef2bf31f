"""Training on the same model code: pretraining and fine-tuning (`gptoss train CONFIG.toml`).

    from gptoss.train import load_config, train
    result = train(load_config("examples/train_tiny.toml"))
    result.model, result.losses, result.checkpoint / "model"   # trained model, per-step loss, saved checkpoint
"""

from .config import TrainConfig, load_config
from .data import Batch, DataError, Document, PackedDataset, read_documents, render_for_training
from .loop import TrainResult, get_lr, init_weights, save_model, train

__all__ = ["TrainConfig", "load_config", "train", "TrainResult", "Document", "PackedDataset", "Batch",
           "DataError", "read_documents", "render_for_training", "get_lr", "init_weights", "save_model"]
