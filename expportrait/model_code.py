"""The registered model's code (MLflow models-from-code: ``register`` logs this file as the
``python_model``; loading it runs this file, nothing is unpickled)."""
import mlflow

from expportrait.serving import ExpPortraitModel

mlflow.models.set_model(ExpPortraitModel())
