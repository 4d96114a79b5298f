from .build import EVALUATOR_REGISTRY
from .evaluator import (
    DatasetEvaluator,
    DatasetEvaluators,
    build_evaluator,
    inference_context,
    inference_on_dataset,
)
from .panoptic_evaluation import COCOPanopticEvaluator, PQStat, pq_compute_single
from .densecap_evaluation import DenseCaptionEvaluator, caption_metrics, densecap_map
from .grounded_caption_evaluation import GroundedCaptionEvaluator
from .pix2cap_evaluation import PanCapEvaluator, Pix2CapEvaluator
from .sapancap_evaluation import SAPancapEvaluator
from .html_report import HtmlReportWriter
from .results import log_results_to_storage, print_results_table, write_results_json
