"""The MLflow Model's code, logged as MLflow's "models from code" (the file is copied into the model; no pickle)."""

import mlflow.models

from mbib.mlflow_model import ImageClassifier

mlflow.models.set_model(ImageClassifier())
