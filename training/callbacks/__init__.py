"""Lightning callbacks of the training platform."""
from .config import MLflowSaveConfigCallback
from .ema import EMA
from .generator_video import GeneratorSamples
from .mlflow_artifacts import LogCheckpointsToMLflow
from .video import ComparisonVideo

__all__ = ["EMA", "ComparisonVideo", "GeneratorSamples", "LogCheckpointsToMLflow", "MLflowSaveConfigCallback"]
