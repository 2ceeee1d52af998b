"""BERT4Rec model and its size table."""

from tuner.model.bert4rec import Bert4Rec, Bert4RecConfig, count_parameters

__all__ = ["Bert4Rec", "Bert4RecConfig", "count_parameters"]
