"""BERT4Rec hyperparameter tuning service: data, model, training loop, Ray Tune and MLflow."""

__version__ = "0.1.0"
