from pix2cap.utils.registry import Registry

EVALUATOR_REGISTRY = Registry("EVALUATOR")
EVALUATOR_REGISTRY.__doc__ = """
Registry for dataset evaluators, built as ``cls(dataset_name=..., output_dir=..., ...)``; they
implement ``reset() / process(inputs, outputs) / evaluate()``.
"""
