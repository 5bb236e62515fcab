"""Training: config schema, the trainer (SFT, continued pre-training, reward model, DPO, ORPO), checkpoints.

    from fasttune.train import TrainConfig, train
    result = train(TrainConfig.from_yaml("configs/sft_tiny.yaml"))
"""
from ..adapters.config import LoraConfig
from .config import ConfigError, DataConfig, ModelConfig, ObjectiveConfig, TrainConfig, TrainSection
from .trainer import OutOfMemory, Trainer, TrainingDiverged, TrainResult, train

__all__ = ["ConfigError", "DataConfig", "LoraConfig", "ModelConfig", "ObjectiveConfig", "OutOfMemory",
           "TrainConfig", "TrainResult", "TrainSection", "Trainer", "TrainingDiverged", "train"]
