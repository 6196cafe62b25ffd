"""Training small models on the CPU: a one-file transformer whose blocks take any sparsen.nn module, the trainer, and
the Lazy Neuron / top-k experiments."""

from sparsen.train.data import ByteVocab, TokenData, load_data, random_token_data, vocab
from sparsen.train.model import LMConfig, TinyLM
from sparsen.train.trainer import ClassifyTask, LMTask, TrainConfig, build_model, load_trained, train

__all__ = ["ByteVocab", "TokenData", "load_data", "random_token_data", "vocab", "LMConfig", "TinyLM", "ClassifyTask",
           "LMTask", "TrainConfig", "build_model", "load_trained", "train"]
