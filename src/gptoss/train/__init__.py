"""Training on the same model code: pretraining and fine-tuning (`gptoss train CONFIG.toml`).

    from gptoss.train import load_config, train
    result = train(load_config("examples/train_tiny.toml"))
    result.model, result.losses, result.checkpoint / "model"   # trained model, per-step loss, saved checkpoint

Data parallel: `torchrun --nproc-per-node 2 -m gptoss train CONFIG.toml` (train/distributed.py); LoRA:
a [lora] section (train/lora.py); GPT-2-style ablations: ModelConfig fields (examples/train_gpt2_tiny.toml).
"""

from .config import TrainConfig, load_config
from .data import Batch, DataError, Document, PackedDataset, read_documents, render_for_training
from .distributed import DistInfo
from .lora import add_lora, merge_lora
from .loop import TrainResult, get_lr, init_weights, save_model, train

__all__ = ["TrainConfig", "load_config", "train", "TrainResult", "Document", "PackedDataset", "Batch",
           "DataError", "read_documents", "render_for_training", "get_lr", "init_weights", "save_model",
           "DistInfo", "add_lora", "merge_lora"]
