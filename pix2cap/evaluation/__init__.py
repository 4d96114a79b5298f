from .build import EVALUATOR_REGISTRY
from .evaluator import (
    DatasetEvaluator,
    DatasetEvaluators,
    build_evaluator,
    inference_context,
    inference_on_dataset,
)
