"""The Pix2Cap model: panoptic segmentation with one caption per segment.

    image -> frozen backbone -> pixel decoder -> masked-attention transformer decoder
          -> per query: class logits, mask logits, query feature
          -> dense caption head (query feature + global image feature -> caption; with the
             scene memory also the object's mask-pooled pixel features, its box and the other
             objects of the image)

Training matches queries to ground-truth segments (Hungarian) and sums the classification,
mask and caption losses of every decoder prediction (``SetCriterion``). Inference runs
Mask2Former's panoptic merge and captions only the queries that became segments, in one
batched decoding call for the whole batch (the official code captions every query).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Collection, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pix2cap.config.config import ConfigError, configurable
from pix2cap.data import MetadataCatalog  # the package: it registers the built-in datasets
from pix2cap.data.caption_formats import (
    SEG_TOKEN,
    STUFF_SEG_TOKEN,
    grounded_to_markup,
    markup_sentence_openers,
    markup_to_grounded,
    truncate_markup,
)
from pix2cap.structures import ImageList

from ..backbone import BACKBONE_REGISTRY
from ..caption_head import (
    CAPTION_HEAD_REGISTRY,
    GroundedMarkupCodec,
    SceneContext,
    build_caption_tokenizer,
    caption_vocab_kwargs,
    decode,
    encode_captions,
)
from ..caption_head.phrase_ties import agreeing_slots, ground_unmarked_mentions
from ..caption_head.scene_memory import mask_boxes
from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from ..pixel_decoder import PIXEL_DECODER_REGISTRY
from ..postprocessing import (
    PanopticPrediction,
    instance_inference,
    panoptic_inference,
    resize_mask_logits,
    resize_panoptic,
    semantic_inference,
)
from ..transformer_decoder import TRANSFORMER_DECODER_REGISTRY
from .build import META_ARCH_REGISTRY

__all__ = ["Pix2Cap", "thing_ids_from_metadata"]

logger = logging.getLogger(__name__)


def thing_ids_from_metadata(dataset_names: Sequence[str]) -> set[int]:
    """Contiguous ids of the thing classes of the first named dataset that declares them.

    Reads ``MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id`` (its values).
    Returns an empty set when no dataset declares things.
    """
    for name in dataset_names:
        mapping = MetadataCatalog.get(name).get("thing_dataset_id_to_contiguous_id")
        if mapping:
            return {int(v) for v in mapping.values()}
    return set()


def class_names_from_metadata(dataset_names: Sequence[str]) -> Optional[list[str]]:
    """Names of the contiguous class ids (``stuff_classes``: every class, detectron2's panoptic
    convention) of the first named dataset that declares them; None when none does."""
    for name in dataset_names:
        names = MetadataCatalog.get(name).get("stuff_classes")
        if names:
            return [str(n) for n in names]
    return None


def _slot_class_names(
    slot_info: list[dict], class_names: Optional[Sequence[str]]
) -> Optional[list[str]]:
    """Each slot's class name ("" without a ``category_id``), or None without names."""
    if class_names is None:
        return None
    return [class_names[info["category_id"]] if "category_id" in info else "" for info in slot_info]


@META_ARCH_REGISTRY.register()
class Pix2Cap(nn.Module):
    """Joint panoptic segmentation and dense captioning.

    ``forward(batched_inputs)`` takes mapper dicts (``pix2cap.data.mappers``):

    * ``"image"``: uint8/float Tensor[3, H, W], RGB on the 0-255 scale;
    * training: ``"instances"`` with ``gt_classes`` Long[N] (contiguous), ``gt_masks``
      Bool[N, H, W], optionally ``gt_iscrowd`` Bool[N] (crowd segments are not targets) and
      ``gt_captions`` list[str] ("" = no caption to learn);
    * inference: optional ``"height"``, ``"width"``: the original size predictions are
      resized to. Inference itself runs at the input's size (the inference resolution), so a
      large original costs only its output maps (:meth:`inference`).

    Returns in training a dict of weighted scalar losses (``loss_ce``, ``loss_mask``,
    ``loss_dice``, ``loss_caption`` and their ``_{i}`` versions for earlier decoder layers).
    In eval mode a list with one dict per image, holding, as enabled:

    * ``"panoptic_seg"``: ``(Int32[height, width] segment ids (0 = VOID), segments_info)``,
      the merge at the inference resolution resized by nearest pixel centre; each segment:
      ``id``, ``category_id`` (contiguous), ``isthing``, ``score``, ``bbox`` ``[x, y, w, h]``
      (measured on the returned map), ``query_index`` (int: the decoder query it came from) and, with
      captioning on, ``caption`` (str); ``pix2cap.structures.PanopticResult`` reads it;
    * ``"grounded_caption"`` (with a grounded caption head): ``{"text", "tagged", "phrases"}``,
      the image's detailed caption, the same in ``<ids:phrase>`` form with the ids of
      ``panoptic_seg``'s segments, and per grounded phrase ``phrase``, ``start``/``end``
      (offsets into ``text``), ``segment_ids`` and ``score``; with ``grounded_phrase_masks``
      on also ``"grounded_phrase_masks"``: Bool[P, height, width], each phrase's mask (the
      union of its tied segments); ``caption_score`` is the caption's mean token
      log-probability;
    * ``"sem_seg"``: Float[K, height, width] class scores (computed at the inference
      resolution, resized bilinearly);
    * ``"instances"``: ``Instances`` with ``pred_masks``, ``pred_boxes`` (XYXY), ``scores``,
      ``pred_classes`` (thing classes only, top ``detections_per_image``); the masks of the
      kept queries only are upsampled to ``height`` x ``width``.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_decoder: nn.Module,
        transformer_decoder: nn.Module,
        caption_head: nn.Module,
        criterion: SetCriterion,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        thing_ids: Collection[int] = (),
        semantic_on: bool = False,
        instance_on: bool = False,
        panoptic_on: bool = True,
        caption_on: bool = True,
        num_beams: int = 1,
        max_caption_length: int = 40,
        detections_per_image: int = 100,
        deep_supervision: bool = True,
        tokenizer: Any = None,
        vocab_file: Optional[str] = None,
        grounded_head: Optional[nn.Module] = None,
        grounded_loss_weights: Optional[dict] = None,
        grounded_max_length: int = 320,
        grounded_num_beams: int = 1,
        grounded_stuff_seg: bool = True,
        grounded_tie_threshold: float = 0.5,
        grounded_phrase_masks: bool = False,
        grounded_caption_agreement: bool = True,
        grounded_mention_ties: bool = True,
        class_names: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            backbone: images ``[B, 3, H, W]`` -> ``{"res2": ..., "res5": ...}``.
            pixel_decoder: backbone features -> ``(mask_features [B, Cm, H/4, W/4],
                multi_scale_features)``, the latter coarse to fine, ``[B, C, h, w]`` each.
            transformer_decoder: ``(multi_scale_features, mask_features[, mask])`` ->
                ``pred_logits`` [B, Q, K+1], ``pred_masks`` [B, Q, H/4, W/4],
                ``query_features`` [B, Q, D], ``aux_outputs``. When its ``forward`` takes a
                ``mask`` argument it gets the padding mask (True on padding).
            caption_head: ``DenseCaptionHead``-like: ``loss`` for training (through the
                criterion) and ``generate(query_feats [N, D], global_feats [N, C], ...)``.
                A head whose ``memory`` is ``"scene"`` also gets ``scene=`` (a
                ``SceneContext`` from its ``scene_context``) for the kept segments, and
                the criterion should then have ``caption_scene_fn=caption_head.scene_context``.
            criterion: the set criterion; its ``caption_loss_fn`` should be
                ``caption_head.loss``.
            num_classes: K, number of categories (without no-object).
            pixel_mean, pixel_std: per-channel normalisation on the 0-255 scale.
            size_divisibility: pad batched images to a multiple of this.
            object_mask_threshold, overlap_threshold: of the panoptic merge.
            thing_ids: contiguous ids of the thing classes.
            semantic_on, instance_on, panoptic_on: which results inference returns.
            caption_on: caption the panoptic segments (ignored without ``panoptic_on``).
            num_beams: 1 = greedy decoding, more = beam search.
            max_caption_length: caption tokens, [CLS]/[SEP] included (training and decoding).
            detections_per_image: at most this many instances, and panoptic queries kept.
            deep_supervision: also compute the losses of every earlier decoder prediction.
            tokenizer: the caption tokenizer (``BertTokenizerFast``-like), the one the
                caption head was sized for; None: built on first use from ``vocab_file``.
                Either way it is checked against the head's vocabulary and special ids.
            vocab_file: ``vocab.txt`` or tokenizer folder; None: the packaged vocabulary.
            grounded_head: a ``GroundedCaptionHead`` (None: no grounded caption); its
                vocabulary is the caption tokenizer's plus the markup tokens.
            grounded_loss_weights: weights of ``loss_grounded_caption``,
                ``loss_grounded_select``, ``loss_grounded_mask`` and ``loss_grounded_dice``.
            grounded_max_length: grounded caption tokens, markup and [CLS]/[SEP] included;
                longer targets are cut at a sentence end (never inside a phrase).
            grounded_num_beams: decoding of the grounded caption.
            grounded_stuff_seg: stuff phrases end in ``[SEG_STUFF]`` (thing ones in ``[SEG]``).
            grounded_tie_threshold: a SEG mask is tied to each kept segment it covers at least
                this share of (none: to the one it overlaps most, by IoU).
            grounded_phrase_masks: also return each phrase's own SEG mask.
            grounded_caption_agreement: a phrase whose SEG selection was learned (not copied
                from a segment's caption) is checked against the kept segments' dense captions
                (``phrase_ties.agreeing_slots``): tied to segments whose caption subject it
                fits, ungrounded when it fits none. Needs ``caption_on``.
            grounded_mention_ties: words the head wrote outside its markup that name exactly
                one kept segment by that check ("is in the sky.") become phrases tied to it
                (``phrase_ties.ground_unmarked_mentions``). Needs ``caption_on``.
            class_names: the name of each contiguous class id, a second name of a segment
                for those checks (None: captions only).
        """
        super().__init__()
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(
                f"pixel_mean and pixel_std need one value per RGB channel, got {list(pixel_mean)} "
                f"and {list(pixel_std)}"
            )
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        head_max_length = getattr(caption_head, "max_length", None)
        if head_max_length is not None and max_caption_length > head_max_length:
            raise ValueError(
                f"max_caption_length={max_caption_length} exceeds the caption head's "
                f"max_length={head_max_length} (its position embeddings end there)"
            )
        bad_things = [i for i in thing_ids if not 0 <= int(i) < num_classes]
        if bad_things:
            raise ValueError(
                f"thing_ids {sorted(bad_things)} are not contiguous class ids in [0, {num_classes})"
            )
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.caption_head = caption_head
        self.criterion = criterion
        self.num_classes = num_classes
        self.size_divisibility = size_divisibility
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.thing_ids = frozenset(int(i) for i in thing_ids)
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.caption_on = caption_on
        self.num_beams = num_beams
        self.max_caption_length = max_caption_length
        self.detections_per_image = detections_per_image
        self.deep_supervision = deep_supervision
        self.vocab_file = vocab_file
        self._tokenizer = None
        if tokenizer is not None:
            # A given tokenizer is checked now, so a mismatch fails at construction.
            self._tokenizer = self._checked_tokenizer(tokenizer)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # Decoders without padding support are still usable (padding is then attended to).
        params = inspect.signature(transformer_decoder.forward).parameters
        self._decoder_takes_mask = "mask" in params
        self._scene_memory = getattr(caption_head, "memory", "query_global") == "scene"
        self.grounded_head = grounded_head
        self.grounded_loss_weights = dict(
            grounded_loss_weights
            or {
                "loss_grounded_caption": 1.0,
                "loss_grounded_select": 1.0,
                "loss_grounded_mask": 1.0,
                "loss_grounded_dice": 1.0,
            }
        )
        self.grounded_max_length = grounded_max_length
        self.grounded_num_beams = grounded_num_beams
        self.grounded_stuff_seg = grounded_stuff_seg
        self.grounded_tie_threshold = grounded_tie_threshold
        self.grounded_phrase_masks = grounded_phrase_masks
        self.grounded_caption_agreement = grounded_caption_agreement
        self.grounded_mention_ties = grounded_mention_ties
        self.class_names = list(class_names) if class_names is not None else None
        self._grounded_codec: Optional[GroundedMarkupCodec] = None
        if grounded_head is not None:
            if grounded_max_length > grounded_head.max_length:
                raise ValueError(
                    f"grounded_max_length={grounded_max_length} exceeds the grounded head's "
                    f"max_length={grounded_head.max_length}"
                )
            if tokenizer is not None:
                self._grounded_codec = self._checked_codec(GroundedMarkupCodec(self._tokenizer))
        if caption_on and not panoptic_on:
            logger.warning("Captions are made for panoptic segments; PANOPTIC_ON is off, so none.")

    @classmethod
    def from_config(cls, cfg) -> dict:
        mf = cfg.MODEL.MASK_FORMER
        head_cfg = cfg.MODEL.CAPTION_HEAD
        seg_head = cfg.MODEL.SEM_SEG_HEAD

        backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg)
        pixel_decoder = PIXEL_DECODER_REGISTRY.get(seg_head.NAME)(cfg, backbone.output_shape())
        transformer_decoder = TRANSFORMER_DECODER_REGISTRY.get(mf.TRANSFORMER_DECODER_NAME)(
            cfg, in_channels=seg_head.CONVS_DIM
        )
        # The tokenizer is the one source of the vocabulary size and special ids; the head's
        # memory widths come from MASK_FORMER.HIDDEN_DIM and SEM_SEG_HEAD.CONVS_DIM.
        tokenizer = build_caption_tokenizer(head_cfg.VOCAB_FILE)
        caption_head = CAPTION_HEAD_REGISTRY.get(head_cfg.NAME)(
            cfg, **caption_vocab_kwargs(tokenizer)
        )

        matcher = HungarianMatcher(
            cost_class=mf.CLASS_WEIGHT,
            cost_mask=mf.MASK_WEIGHT,
            cost_dice=mf.DICE_WEIGHT,
            num_points=mf.TRAIN_NUM_POINTS,
        )
        criterion = SetCriterion(
            num_classes=seg_head.NUM_CLASSES,
            matcher=matcher,
            weight_dict={
                "loss_ce": mf.CLASS_WEIGHT,
                "loss_mask": mf.MASK_WEIGHT,
                "loss_dice": mf.DICE_WEIGHT,
                "loss_caption": head_cfg.LOSS_WEIGHT,
            },
            eos_coef=mf.NO_OBJECT_WEIGHT,
            losses=("labels", "masks", "captions"),
            num_points=mf.TRAIN_NUM_POINTS,
            oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
            caption_loss_fn=caption_head.loss,
            # The criterion also hands it the targets' host-measured boxes and pooled
            # features, where its scene_context takes them (boxes=, pooled=).
            caption_scene_fn=(
                caption_head.scene_context
                if getattr(caption_head, "memory", None) == "scene"
                else None
            ),
            num_caption_layers=head_cfg.NUM_LOSS_LAYERS if head_cfg.NUM_LOSS_LAYERS > 0 else None,
            caption_pad_token_id=tokenizer.pad_token_id,
            caption_scene_masks=head_cfg.SCENE_TRAIN_MASKS,
        )

        grounded = cfg.MODEL.GROUNDED_HEAD
        grounded_kwargs: dict = {}
        if grounded.ENABLED:
            grounded_kwargs = {
                "grounded_head": CAPTION_HEAD_REGISTRY.get(grounded.NAME)(
                    cfg, codec=GroundedMarkupCodec(tokenizer)
                ),
                "grounded_loss_weights": {
                    "loss_grounded_caption": grounded.CAPTION_WEIGHT,
                    "loss_grounded_select": grounded.SELECT_WEIGHT,
                    "loss_grounded_mask": grounded.MASK_WEIGHT,
                    "loss_grounded_dice": grounded.DICE_WEIGHT,
                },
                "grounded_max_length": grounded.MAX_LENGTH,
                "grounded_num_beams": grounded.NUM_BEAMS,
                "grounded_stuff_seg": grounded.STUFF_SEG,
                "grounded_tie_threshold": grounded.TIE_THRESHOLD,
                "grounded_phrase_masks": grounded.RETURN_PHRASE_MASKS,
                "grounded_caption_agreement": grounded.CAPTION_AGREEMENT,
                "grounded_mention_ties": grounded.MENTION_TIES,
            }

        dataset_names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
        thing_ids = thing_ids_from_metadata(dataset_names)
        if not thing_ids:
            logger.warning(
                "No thing classes found in the metadata of %s; every class is treated as stuff",
                dataset_names or "any dataset (DATASETS.TRAIN/TEST are empty)",
            )
        class_names = class_names_from_metadata(dataset_names)
        if class_names is not None and len(class_names) != seg_head.NUM_CLASSES:
            class_names = None  # not this model's classes: its captions alone name segments
        too_large = sorted(i for i in thing_ids if i >= seg_head.NUM_CLASSES)
        if too_large:
            raise ConfigError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={seg_head.NUM_CLASSES} is too small for the "
                f"datasets {dataset_names}: they have thing class ids up to {too_large[-1]}"
            )

        size_divisibility = max(
            int(cfg.INPUT.SIZE_DIVISIBILITY), int(getattr(backbone, "size_divisibility", 0))
        )
        return {
            "backbone": backbone,
            "pixel_decoder": pixel_decoder,
            "transformer_decoder": transformer_decoder,
            "caption_head": caption_head,
            "criterion": criterion,
            "num_classes": seg_head.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": size_divisibility,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "thing_ids": thing_ids,
            "class_names": class_names,
            "semantic_on": mf.TEST.SEMANTIC_ON,
            "instance_on": mf.TEST.INSTANCE_ON,
            "panoptic_on": mf.TEST.PANOPTIC_ON,
            "caption_on": mf.TEST.CAPTION_ON,
            "num_beams": head_cfg.NUM_BEAMS,
            "max_caption_length": head_cfg.MAX_LENGTH,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "deep_supervision": mf.DEEP_SUPERVISION,
            "tokenizer": tokenizer,
            "vocab_file": head_cfg.VOCAB_FILE or None,
            **grounded_kwargs,
        }

    # -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def tokenizer(self):
        """The caption tokenizer; unless given, built on first use and checked then."""
        if self._tokenizer is None:
            self._tokenizer = self._checked_tokenizer(build_caption_tokenizer(self.vocab_file))
        return self._tokenizer

    @property
    def grounded_codec(self) -> GroundedMarkupCodec:
        """Token ids of the grounded caption markup, over the caption tokenizer."""
        if self._grounded_codec is None:
            self._grounded_codec = self._checked_codec(GroundedMarkupCodec(self.tokenizer))
        return self._grounded_codec

    def _checked_codec(self, codec: GroundedMarkupCodec) -> GroundedMarkupCodec:
        """``codec``, after checking that the grounded head was sized for its ids."""
        head = self.grounded_head
        if head is not None and codec.vocab_size != head.vocab_size:
            raise ValueError(
                f"the grounded caption vocabulary ({self.vocab_file or 'packaged'} + markup) "
                f"has {codec.vocab_size} tokens but the grounded head {head.vocab_size}"
            )
        if head is not None and list(codec.seg_token_ids) != head.seg_token_ids.tolist():
            raise ValueError(
                f"the grounded head's SEG ids {head.seg_token_ids.tolist()} are not the "
                f"markup's {list(codec.seg_token_ids)}"
            )
        return codec

    def _checked_tokenizer(self, tokenizer):
        """``tokenizer``, after checking that the caption head can use its token ids."""
        vocab_size = getattr(self.caption_head, "vocab_size", None)
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise ValueError(
                f"the caption vocabulary ({self.vocab_file or 'packaged'}) has "
                f"{len(tokenizer)} tokens but the caption head only {vocab_size}"
            )
        for name, token_id in (
            ("bos_token_id", tokenizer.cls_token_id),
            ("eos_token_id", tokenizer.sep_token_id),
            ("pad_token_id", tokenizer.pad_token_id),
        ):
            head_id = getattr(self.caption_head, name, token_id)
            if head_id != token_id:
                raise ValueError(f"caption head {name}={head_id} but the tokenizer's is {token_id}")
        return tokenizer

    # -----------------------------------------------------------------------------------------
    def forward(self, batched_inputs: list[dict]):
        """See the class docstring for inputs and outputs."""
        if not batched_inputs:
            raise ValueError("Pix2Cap.forward needs at least one input dict")
        images = [self._normalize(x["image"]) for x in batched_inputs]
        image_list = ImageList.from_tensors(images, self.size_divisibility)
        if self.training:
            # Targets first: a bad input fails before the network runs.
            targets = self.prepare_targets(batched_inputs, image_list)
            outputs = self._predict(image_list, self.image_frames(batched_inputs))
            if not self.deep_supervision:
                outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
            if self.grounded_head is None:
                return self.criterion.weighted(self.criterion(outputs, targets))
            # The grounded head reads each segment through the query the criterion matches to
            # it in the final prediction: one matching for both.
            final = {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}
            indices = self.criterion.matcher(final, targets)
            losses = self.criterion.weighted(self.criterion(outputs, targets, indices))
            losses.update(
                self._grounded_losses(batched_inputs, image_list, outputs, targets, indices)
            )
            return losses
        outputs = self._predict(image_list, self.image_frames(batched_inputs))
        return self.inference(batched_inputs, image_list, outputs)

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"'image' must be a [3, H, W] tensor, got {tuple(image.shape)}")
        # Non-blocking: the copy queues behind the device's work instead of waiting for it.
        return (image.to(self.device, non_blocking=True).float() - self.pixel_mean) / self.pixel_std

    def _padding_mask(self, image_list: ImageList) -> Optional[torch.Tensor]:
        """Bool[B, H, W], True on padding; None when no image of the batch is padded."""
        batch, _, height, width = image_list.tensor.shape
        if all(size == (height, width) for size in image_list.image_sizes):
            return None
        mask = torch.ones((batch, height, width), dtype=torch.bool, device=image_list.device)
        for i, (h, w) in enumerate(image_list.image_sizes):
            mask[i, :h, :w] = False
        return mask

    def _predict(self, image_list: ImageList, frames: Optional[torch.Tensor] = None) -> dict:
        """Backbone, pixel decoder, transformer decoder and the global feature.

        Returns the transformer decoder's outputs plus ``"global_features"`` [B, C] (also put
        in every ``aux_outputs`` entry); for a scene-memory caption head also
        ``"pixel_features"`` (the multi-scale levels, coarse to fine, then the mask features:
        ``[B, C_l, h_l, w_l]`` each) and ``"grid_window"`` Float[B, 4]: where each image's
        padded grid lies in its original image, ``(x0, y0, x1, y1)`` in the original's
        normalised coordinates (:meth:`grid_windows`), so boxes mean the same under any crop,
        rescale or batch padding.
        """
        features = self.backbone(image_list.tensor)
        mask_features, multi_scale_features = self.pixel_decoder(features)
        padding = self._padding_mask(image_list)
        if self._decoder_takes_mask:
            outputs = self.transformer_decoder(multi_scale_features, mask_features, mask=padding)
        else:
            outputs = self.transformer_decoder(multi_scale_features, mask_features)
        global_features = self.global_features(multi_scale_features[0], padding)
        outputs["global_features"] = global_features
        for aux in outputs.get("aux_outputs") or []:
            aux["global_features"] = global_features
        if self._scene_memory:
            outputs["pixel_features"] = [*multi_scale_features, mask_features]
        if self._scene_memory or self.grounded_head is not None:
            outputs["grid_window"] = self.grid_windows(image_list, frames).to(
                mask_features.device, non_blocking=True
            )
        if self.grounded_head is not None:
            outputs["mask_features"] = mask_features
        return outputs

    @staticmethod
    def grid_windows(image_list: ImageList, frames: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Where each padded grid lies in its original image.

        Args:
            image_list: the batch; image ``b`` fills the top-left ``image_sizes[b]`` of the grid.
            frames: Float[B, 4], each image's ``image_frame`` from the mapper (the image's own
                corners in its original's normalised coordinates); None: ``(0, 0, 1, 1)``.

        Returns:
            Float[B, 4] ``(x0, y0, x1, y1)``: the grid's corners in the original's normalised
            coordinates (beyond 1 where the grid holds padding).
        """
        padded_h, padded_w = image_list.tensor.shape[-2:]
        sizes = torch.tensor(image_list.image_sizes, dtype=torch.float64)  # [B, 2] (h, w)
        if frames is None:
            frames = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(sizes), 4)
        frames = frames.to(torch.float64)
        stretch = torch.stack([padded_w / sizes[:, 1], padded_h / sizes[:, 0]], dim=1)  # [B, 2]
        low = frames[:, :2]
        high = low + (frames[:, 2:] - low) * stretch
        return torch.cat([low, high], dim=1).float()

    @staticmethod
    def image_frames(batched_inputs: list[dict]) -> Optional[torch.Tensor]:
        """Float[B, 4] of the inputs' ``image_frame`` ((0, 0, 1, 1) where absent), or None
        when no input has one."""
        if not any("image_frame" in x for x in batched_inputs):
            return None
        return torch.tensor(
            [list(x.get("image_frame", (0.0, 0.0, 1.0, 1.0))) for x in batched_inputs],
            dtype=torch.float64,
        )

    @staticmethod
    def global_features(
        coarsest: torch.Tensor, padding: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Max-pool of the coarsest multi-scale level over the image (padding excluded).

        Args:
            coarsest: ``[B, C, h, w]``; padding: optional Bool[B, H, W], True on padding.

        Returns:
            ``[B, C]``.
        """
        if padding is not None:
            # Excluding padding keeps an image's global token independent of its batch-mates.
            pad = F.interpolate(padding[:, None].float(), size=coarsest.shape[-2:], mode="nearest")
            pad = pad.bool()  # [B, 1, h, w]
            pad = pad & ~pad.flatten(1).all(dim=1)[:, None, None, None]
            coarsest = coarsest.masked_fill(pad, float("-inf"))
        return coarsest.flatten(2).amax(dim=-1)

    # -----------------------------------------------------------------------------------------
    def prepare_targets(self, batched_inputs: list[dict], image_list: ImageList) -> list[dict]:
        """Criterion targets, one dict per image.

        Everything is prepared on the host, where the loader's targets are, and copied to the
        device without waiting for it (non-blocking copies); what the losses need to know on
        the host is computed here too, so that they never read the device.

        Returns:
            ``{"labels": Long[M], "masks": Bool[M, H_pad, W_pad], "caption_tokens":
            Long[M, T], "captioned": Bool[M] (host)}`` with crowd segments dropped; masks
            zero-padded like the images; ``T <= max_caption_length`` is the longest caption of
            the batch; ``captioned``: the segment has a caption to learn (more than [CLS]
            [SEP]). With a scene memory built from the target masks, or a grounded caption
            head, also ``"scene_boxes"`` [M, 6]: each mask's box as the scene memory measures
            it (``scene_memory.mask_boxes(mask, grid window, largest_part=True)``).
        """
        height, width = image_list.tensor.shape[-2:]
        labels, masks, captions = [], [], []
        for index, x in enumerate(batched_inputs):
            if "instances" not in x:
                raise KeyError(
                    f"training input {x.get('file_name', index)!r} has no 'instances'; "
                    "Pix2Cap trains on mapper outputs with targets (INPUT.DATASET_MAPPER_NAME, "
                    "e.g. panoptic_lsj)"
                )
            instances = x["instances"]
            rows = self._kept_rows(instances)
            gt_masks = instances.gt_masks[rows.to(instances.gt_masks.device)]
            h, w = image_list.image_sizes[index]
            if tuple(gt_masks.shape[-2:]) != (h, w):
                raise ValueError(
                    f"training input {x.get('file_name', index)!r}: gt_masks are "
                    f"{tuple(gt_masks.shape[-2:])} but the image is {(h, w)}"
                )
            padded = torch.zeros(
                (gt_masks.shape[0], height, width), dtype=torch.bool, device=gt_masks.device
            )
            padded[:, :h, :w] = gt_masks.bool()
            labels.append(instances.gt_classes[rows.to(instances.gt_classes.device)])
            masks.append(padded)
            if instances.has("gt_captions"):
                captions.append([instances.gt_captions[i] for i in rows.tolist()])
            else:
                captions.append([""] * len(rows))
        # One tokenizer call for the whole batch.
        flat = [c for per_image in captions for c in per_image]
        tokens = encode_captions(flat, self.max_caption_length, tokenizer=self.tokenizer)
        # Columns that are [PAD] in every row only cost decoder and vocabulary compute.
        lengths = (tokens != self.tokenizer.pad_token_id).sum(1).tolist()
        if tokens.numel():
            tokens = tokens[:, : max(max(lengths), 2)]
        # [CLS] [SEP] alone (an empty description) is no caption to learn.
        captioned = torch.tensor([n > 2 for n in lengths], dtype=torch.bool)
        sizes = [len(c) for c in captions]
        boxes = self._target_boxes(masks, image_list, batched_inputs)
        tokens = tokens.to(self.device, non_blocking=True).split(sizes)
        targets = []
        for b, (lab, m, tok, cap) in enumerate(zip(labels, masks, tokens, captioned.split(sizes))):
            target = {
                "labels": lab.to(self.device, non_blocking=True).long(),
                "masks": m.to(self.device, non_blocking=True),
                "caption_tokens": tok,
                "captioned": cap,
            }
            if boxes is not None:
                target["scene_boxes"] = boxes[b]
            targets.append(target)
        return targets

    @staticmethod
    def _kept_rows(instances) -> torch.Tensor:
        """Long[n] the rows of ``instances`` that are targets (crowd segments dropped), read
        on the host."""
        if instances.has("gt_iscrowd"):
            crowd = instances.gt_iscrowd.tolist()
            return torch.tensor([i for i, c in enumerate(crowd) if not c], dtype=torch.long)
        return torch.arange(len(instances))

    def _target_boxes(
        self, masks: list[torch.Tensor], image_list: ImageList, batched_inputs: list[dict]
    ) -> Optional[list[torch.Tensor]]:
        """Per image the scene boxes of its padded target ``masks`` (where the loader put
        them, the host: connected components are a host computation), on the device; None
        when no loss reads them."""
        scene_targets = self._scene_memory and (
            getattr(self.criterion, "caption_scene_masks", "target") == "target"
        )
        if not (scene_targets or self.grounded_head is not None):
            return None
        windows = self.grid_windows(image_list, self.image_frames(batched_inputs))
        return [
            mask_boxes(m.float(), window.to(m.device), largest_part=True).to(
                self.device, non_blocking=True
            )
            for m, window in zip(masks, windows)
        ]

    # -----------------------------------------------------------------------------------------
    def inference(
        self, batched_inputs: list[dict], image_list: ImageList, outputs: dict
    ) -> list[dict]:
        """Per-image results at the original size (see the class docstring).

        Everything is computed at the inference resolution (each image's size in the batch,
        without padding); only the results are brought to the original ``height`` x
        ``width`` (``postprocessing``: the panoptic id map by nearest pixel centre), so the
        memory a large photo costs beyond the model's own is the returned maps. Captions and
        the grounded caption read the inference-resolution merge.
        """
        padded_size = tuple(image_list.tensor.shape[-2:])
        results: list[dict] = []
        panoptic: list[tuple[int, PanopticPrediction]] = []
        for b, x in enumerate(batched_inputs):
            image_size = image_list.image_sizes[b]
            output_size = (int(x.get("height", image_size[0])), int(x.get("width", image_size[1])))
            mask_pred = resize_mask_logits(
                outputs["pred_masks"][b], padded_size, image_size
            )  # [Q, h, w], the inference resolution
            mask_cls = outputs["pred_logits"][b].float()  # [Q, K+1]
            result: dict[str, Any] = {}
            if self.semantic_on:
                result["sem_seg"] = semantic_inference(mask_cls, mask_pred, output_size)
            if self.panoptic_on:
                merged = panoptic_inference(
                    mask_cls,
                    mask_pred,
                    thing_ids=self.thing_ids,
                    object_mask_threshold=self.object_mask_threshold,
                    overlap_threshold=self.overlap_threshold,
                    max_segments=self.detections_per_image,
                )
                final = resize_panoptic(merged, output_size)
                # The query each segment came from travels with it (its caption's source).
                for info, query in zip(final.segments_info, final.query_indices.tolist()):
                    info["query_index"] = query
                result["panoptic_seg"] = (final.panoptic_seg, final.segments_info)
                # The caption stages read the small map and write into the final segments.
                panoptic.append(
                    (
                        b,
                        merged._replace(
                            segments_info=final.segments_info, query_indices=final.query_indices
                        ),
                    )
                )
            if self.instance_on:
                result["instances"] = instance_inference(
                    mask_cls,
                    mask_pred,
                    thing_ids=self.thing_ids,
                    max_detections=self.detections_per_image,
                    output_size=output_size,
                )
            results.append(result)
        if self.caption_on and panoptic:
            self._caption_segments(outputs, panoptic, image_list)
        if self.grounded_head is not None and panoptic:
            self._grounded_captions(outputs, results, panoptic, image_list)
        return results

    def _caption_segments(
        self,
        outputs: dict,
        panoptic: list[tuple[int, PanopticPrediction]],
        image_list: ImageList,
    ) -> None:
        """Write ``caption`` into every segment, with one decoding call for the batch.

        Only the queries behind kept segments are decoded; a merged stuff segment is
        described by its highest-scoring query. With the scene memory, a segment's other
        objects are the other kept segments of its image, and its pooling mask and box are its
        segment's final mask (what training reads from the ground truth).
        """
        query_features = outputs["query_features"]  # [B, Q, D]
        global_features = outputs["global_features"]  # [B, C]
        feats, globals_, scenes = [], [], []
        for b, prediction in panoptic:
            index = prediction.query_indices.to(query_features.device)
            feats.append(query_features[b, index])
            globals_.append(global_features[b].expand(index.numel(), -1))
            if self._scene_memory and index.numel():
                scenes.append(self._segment_scene(outputs, b, index, prediction, image_list))
        feats = torch.cat(feats)
        if feats.shape[0] == 0:
            return
        extra = {}
        if self._scene_memory:
            extra["scene"] = SceneContext.cat(scenes).to(torch.float32)
        tokens = self.caption_head.generate(
            feats.float(),
            torch.cat(globals_).float(),
            max_length=self.max_caption_length,
            num_beams=self.num_beams,
            **extra,
        )
        texts = iter(decode(tokens, tokenizer=self.tokenizer))
        for _, prediction in panoptic:
            for info in prediction.segments_info:
                info["caption"] = next(texts)

    def _segment_scene(
        self,
        outputs: dict,
        b: int,
        index: torch.Tensor,
        prediction: PanopticPrediction,
        image_list: ImageList,
    ) -> SceneContext:
        """Scene facts of image ``b``'s kept segments, from their queries ``index`` (Long[n])
        and their masks in ``prediction`` (at the inference resolution), padded like the
        input grid."""
        seg = prediction.panoptic_seg
        ids = torch.tensor([info["id"] for info in prediction.segments_info], device=seg.device)
        masks = (seg[None] == ids[:, None, None]).float()  # [n, h, w]
        h, w = image_list.image_sizes[b]
        padded_h, padded_w = image_list.tensor.shape[-2:]
        masks = F.pad(masks, (0, padded_w - w, 0, padded_h - h))
        return self.caption_head.scene_context(
            outputs["query_features"][b, index],
            masks.to(outputs["query_features"].device),
            [level[b] for level in outputs["pixel_features"]],
            window=outputs["grid_window"][b],
        )

    # -----------------------------------------------------------------------------------------
    # Grounded caption (PGC)
    # -----------------------------------------------------------------------------------------
    def _grounded_losses(
        self,
        batched_inputs: list[dict],
        image_list: ImageList,
        outputs: dict,
        targets: list[dict],
        indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Weighted ``loss_grounded_*`` of a training batch.

        The memory's slots are the image's ground-truth segments in the order its caption
        describes them (:meth:`_caption_slot_order`), each read through the query
        Hungarian-matched to it (``indices``: the criterion's matching of the final decoder
        layer, host tensors) and its ground-truth mask, as the dense caption head's scene
        memory is in training.
        """
        host_tokens, slot_rows, seg_slots, seg_masks, seg_valid = self._grounded_targets(
            batched_inputs, image_list
        )
        tokens = host_tokens.to(self.device, non_blocking=True)
        # Each target row's caption: its segment's ground-truth description.
        row_captions = []
        for x in batched_inputs:
            instances = x["instances"]
            has = instances.has("gt_captions")
            texts = list(instances.gt_captions) if has else [""] * len(instances)
            if instances.has("gt_iscrowd"):
                texts = [t for t, crowd in zip(texts, instances.gt_iscrowd.tolist()) if not crowd]
            row_captions.append(texts)
        queries, slot_masks, captions = [], [], []
        slot_boxes: Optional[list[torch.Tensor]] = []
        for b, (src, tgt) in enumerate(indices):
            # The matching is on the host: the slots are chosen there.
            query_of_row = dict(zip(tgt.tolist(), src.tolist()))
            order = slot_rows[b].tolist()
            # A segment left without a query (more segments than queries) has no slot.
            columns = [k for k, r in enumerate(order) if r in query_of_row]
            kept = [order[k] for k in columns]
            seg_slots[b] = seg_slots[b][:, torch.tensor(columns, dtype=torch.long)]
            queries.append(torch.tensor([query_of_row[r] for r in kept], dtype=torch.long))
            rows = torch.tensor(kept, dtype=torch.long).to(self.device, non_blocking=True)
            slot_masks.append(targets[b]["masks"][rows].float())
            if slot_boxes is not None and "scene_boxes" in targets[b]:
                slot_boxes.append(targets[b]["scene_boxes"][rows])
            else:
                slot_boxes = None
            captions.append([row_captions[b][r] for r in kept])
        memory, valid, copy_ids = self._slot_memory(
            outputs, queries, slot_masks, captions, slot_boxes=slot_boxes
        )
        losses = self.grounded_head.losses(
            memory,
            valid,
            tokens,
            slot_masks,
            seg_slots,
            seg_masks,
            seg_valid,
            copy_ids=copy_ids,
            host_tokens=host_tokens,
        )
        return {k: v * self.grounded_loss_weights.get(k, 1.0) for k, v in losses.items()}

    def _slot_memory(
        self,
        outputs: dict,
        queries: list[torch.Tensor],
        slot_masks: list[torch.Tensor],
        captions: list[list[str]],
        slot_boxes: Optional[list[torch.Tensor]] = None,
    ):
        """The grounded head's memory (``image_memory``'s memory, valid, copy ids): per image
        the slots' queries Long[n_b] (into the final decoder outputs), their masks [n_b, H_pad,
        W_pad] and their captions (read by a head with ``copy_captions``); ``slot_boxes``:
        their boxes when known (training: the targets' ``scene_boxes``)."""
        device = outputs["query_features"].device
        queries = [q.to(device, non_blocking=True) for q in queries]
        slot_captions = None
        if getattr(self.grounded_head, "copy_captions", False):
            flat = [c for per_image in captions for c in per_image]
            tokens = encode_captions(flat, self.max_caption_length, tokenizer=self.tokenizer)
            if tokens.numel():
                length = max((tokens != self.tokenizer.pad_token_id).sum(1).tolist())
                tokens = tokens[:, : max(length, 2)]
            slot_captions = list(
                tokens.to(device, non_blocking=True).split([len(c) for c in captions])
            )
        extra = {} if slot_boxes is None else {"slot_boxes": slot_boxes}
        return self.grounded_head.image_memory(
            [outputs["query_features"][b, q] for b, q in enumerate(queries)],
            [outputs["pred_logits"][b, q] for b, q in enumerate(queries)],
            slot_masks,
            outputs["mask_features"],
            outputs["global_features"],
            outputs.get("grid_window"),
            slot_captions=slot_captions,
            **extra,
        )

    def prepare_grounded_targets(self, batched_inputs: list[dict], image_list: ImageList):
        """Grounded caption targets of a training batch.

        Each input's ``grounded_caption`` (``parse_grounded_caption``'s dict, its segment ids
        those of the input's ``instances.gt_segment_ids``) becomes ``<p> phrase </p> [SEG]``
        markup, cut at a sentence end to ``grounded_max_length`` tokens; each SEG's targets
        are the phrase's segments that survived the crop.

        Returns:
            ``(tokens, slot_rows, seg_slots, seg_masks, seg_valid)``: tokens Long[B, T] (a row
            of [PAD] for an input without a grounded caption); per image, Long[n_b] the
            non-crowd segments (rows of :meth:`prepare_targets`' targets) in the order the
            caption describes them (:meth:`_caption_slot_order`); Bool[S_b, n_b] the segments each
            SEG names; Bool[S_b, H_pad, W_pad] their union; Bool[S_b] (False: every segment of
            the phrase was cropped away, so no selection or mask loss). The tokens and SEG
            masks are on the model's device, the rest on the host.
        """
        tokens, *rest = self._grounded_targets(batched_inputs, image_list)
        return (tokens.to(self.device, non_blocking=True), *rest)

    def _grounded_targets(self, batched_inputs: list[dict], image_list: ImageList):
        """:meth:`prepare_grounded_targets` with the tokens left on the host, where they are
        built (the losses plan the SEGs from them)."""
        codec = self.grounded_codec
        height, width = image_list.tensor.shape[-2:]
        markups, has_caption = [], []
        slot_rows, seg_slots, seg_masks, seg_valid = [], [], [], []
        for index, x in enumerate(batched_inputs):
            grounded = x.get("grounded_caption")
            if grounded is not None and not isinstance(grounded, dict):
                raise TypeError(
                    f"training input {x.get('file_name', index)!r}: 'grounded_caption' must be "
                    f"the loader's parsed dict, got {type(grounded).__name__}"
                )
            instances = x["instances"]
            kept_rows = self._kept_rows(instances)
            keep = [False] * len(instances)
            for r in kept_rows.tolist():
                keep[r] = True
            ids = instances.gt_segment_ids.tolist() if instances.has("gt_segment_ids") else []
            # Target row (crowd segments dropped, as in prepare_targets) of each segment id.
            row_of = {}
            for i, k in zip(ids, keep):
                if k:
                    row_of[int(i)] = len(row_of)
            classes = instances.gt_classes[kept_rows.to(instances.gt_classes.device)].tolist()

            def seg_token(segment_ids: list[int]) -> str:
                present = [classes[row_of[i]] for i in segment_ids if i in row_of]
                stuff = bool(present) and all(c not in self.thing_ids for c in present)
                return STUFF_SEG_TOKEN if self.grounded_stuff_seg and stuff else SEG_TOKEN

            if not grounded or not grounded.get("text"):
                markup, segs = "", []
            else:
                markup, segs = grounded_to_markup(grounded, seg_token)
                markup, segs = truncate_markup(
                    markup, segs, codec.count_tokens, self.grounded_max_length
                )
            markups.append(markup)
            has_caption.append(bool(markup))
            order = self._caption_slot_order(markup, segs, row_of, classes)
            slot_of_row = {r: k for k, r in enumerate(order)}
            named = [
                sorted({slot_of_row[row_of[i]] for i in segment_ids if i in row_of})
                for segment_ids in segs
            ]
            slots = torch.zeros((len(segs), len(order)), dtype=torch.bool)
            for s_index, columns in enumerate(named):
                slots[s_index, columns] = True
            gt_masks = instances.gt_masks[kept_rows.to(instances.gt_masks.device)]
            h, w = image_list.image_sizes[index]
            # Built where the loader's masks are (the host), then copied without waiting.
            masks = torch.zeros(
                (len(segs), height, width), dtype=torch.bool, device=gt_masks.device
            )
            for s_index, columns in enumerate(named):
                if columns:
                    rows = [order[k] for k in columns]
                    masks[s_index, :h, :w] = gt_masks[rows].bool().any(dim=0)
            slot_rows.append(torch.tensor(order, dtype=torch.long))
            seg_slots.append(slots)
            seg_masks.append(masks.to(self.device, non_blocking=True))
            seg_valid.append(slots.any(dim=1))
        tokens = codec.encode(markups, self.grounded_max_length)
        for row, has in enumerate(has_caption):
            if not has:
                tokens[row] = self.tokenizer.pad_token_id
        lengths = (tokens != self.tokenizer.pad_token_id).sum(1).tolist()
        tokens = tokens[:, : max(max(lengths, default=0), 2)]
        return tokens, slot_rows, seg_slots, seg_masks, seg_valid

    def _caption_slot_order(
        self, markup: str, segs: list[list[int]], row_of: dict[int, int], classes: list[int]
    ) -> list[int]:
        """The target rows as the grounded head's slots in training, in the order the caption
        describes them: stuff in the order it is first named; then things in the order they
        open a sentence as its only segment (its subject: the k-th described thing is the k-th
        thing slot, as at inference the k-th thing from the left), then the things only
        named elsewhere, in order of first mention; then the segments never named."""
        mentioned = list(dict.fromkeys(row_of[i] for seg in segs for i in seg if i in row_of))
        subjects = list(
            dict.fromkeys(
                row_of[seg[0]]
                for seg, opens in zip(segs, markup_sentence_openers(markup))
                if opens and len(seg) == 1 and seg[0] in row_of
            )
        )
        is_thing = [c in self.thing_ids for c in classes]
        order = [r for r in mentioned if not is_thing[r]]
        order += [r for r in subjects if is_thing[r]]
        described = set(subjects)
        order += [r for r in mentioned if is_thing[r] and r not in described]
        named = set(order)
        return order + [r for r in range(len(row_of)) if r not in named]

    @staticmethod
    def _slot_order(segment_masks: torch.Tensor, segments_info: list[dict]) -> list[int]:
        """The order of an image's kept segments in the grounded head's memory: stuff first,
        top to bottom (by mask centroid), then things left to right."""
        height, width = segment_masks.shape[-2:]
        ys = torch.arange(height, device=segment_masks.device, dtype=torch.float32)
        xs = torch.arange(width, device=segment_masks.device, dtype=torch.float32)
        area = segment_masks.flatten(1).sum(1).clamp(min=1)
        cy = (segment_masks.sum(2) * ys).sum(1) / area
        cx = (segment_masks.sum(1) * xs).sum(1) / area
        keys = [
            (bool(info.get("isthing")), float(cx[k] if info.get("isthing") else cy[k]), k)
            for k, info in enumerate(segments_info)
        ]
        return [k for _, _, k in sorted(keys)]

    def _grounded_captions(
        self,
        outputs: dict,
        results: list[dict],
        panoptic: list[tuple[int, PanopticPrediction]],
        image_list: ImageList,
    ) -> None:
        """Write ``grounded_caption`` (and optionally ``grounded_phrase_masks``) into every
        result: the kept segments are the memory's slots, one decoding call for the batch, and
        each SEG tied to the segments it selects. ``panoptic`` holds every image's merge at the
        inference resolution (the slots' masks); the phrase masks come from the results' maps
        at the original size."""
        queries, slot_masks, orders, captions = [], [], [], []
        padded_h, padded_w = image_list.tensor.shape[-2:]
        for b, prediction in panoptic:
            seg, segments_info = prediction.panoptic_seg, prediction.segments_info
            ids = torch.tensor([info["id"] for info in segments_info], device=seg.device)
            masks = seg[None] == ids[:, None, None]  # [n, h, w]
            order = self._slot_order(masks, segments_info)
            queries.append(
                torch.tensor([segments_info[k]["query_index"] for k in order], dtype=torch.long)
            )
            h, w = image_list.image_sizes[b]
            slot_masks.append(F.pad(masks[order].float(), (0, padded_w - w, 0, padded_h - h)))
            orders.append(order)
            # The slots' dense captions, written just before (empty without captioning).
            captions.append([segments_info[k].get("caption", "") for k in order])
        memory, valid, copy_ids = self._slot_memory(outputs, queries, slot_masks, captions)
        tokens, scores, selections, seg_kinds, copied = self.grounded_head.generate_grounded(
            memory,
            valid,
            max_length=self.grounded_max_length,
            num_beams=self.grounded_num_beams,
            copy_ids=copy_ids,
            slot_counts=[len(order) for order in orders],
        )
        markups = self.grounded_codec.decode(tokens)
        stuff_id = self.grounded_codec.markup_ids[STUFF_SEG_TOKEN]
        for b, result in enumerate(results):
            segments_info = result["panoptic_seg"][1]
            slot_info = [segments_info[k] for k in orders[b]]
            stuff = (seg_kinds[b] == stuff_id).tolist()
            ties = [
                self._tie_segments(selections[b][s], slot_info, stuff[s])
                for s in range(selections[b].shape[0])
            ]
            markup = markups[b]
            if self.grounded_caption_agreement and self.caption_on:
                ties = self._agreeing_ties(
                    markup, ties, selections[b], copied[b], slot_info, self.class_names
                )
            if self.grounded_mention_ties and self.caption_on:
                markup, ties = self._mention_ties(markup, ties, slot_info, self.class_names)
            grounded = markup_to_grounded(markup, [[i for i, _ in t] for t in ties])
            phrase_ties = []
            for phrase in grounded["phrases"]:
                s = phrase.pop("seg_index")
                tied = ties[s] if s is not None and s < len(ties) else []
                phrase["score"] = max((p for _, p in tied), default=None)
                phrase_ties.append([segment_id for segment_id, _ in tied])
            grounded["caption_score"] = float(scores[b])
            result["grounded_caption"] = grounded
            if self.grounded_phrase_masks:
                # Full-size masks only when asked for: P of them at the original size.
                panoptic_seg = result["panoptic_seg"][0]
                masks = torch.zeros((len(phrase_ties), *panoptic_seg.shape), dtype=torch.bool)
                for p, segment_ids in enumerate(phrase_ties):
                    if segment_ids:
                        tied_ids = torch.tensor(segment_ids, dtype=panoptic_seg.dtype)
                        masks[p] = torch.isin(panoptic_seg, tied_ids.to(panoptic_seg.device)).cpu()
                result["grounded_phrase_masks"] = masks

    @staticmethod
    def _agreeing_ties(
        markup: str,
        ties: list[list[tuple[int, float]]],
        selection: torch.Tensor,
        copied: torch.Tensor,
        slot_info: list[dict],
        class_names: Optional[Sequence[str]] = None,
    ) -> list[list[tuple[int, float]]]:
        """``ties`` (per SEG, as :meth:`_tie_segments`) with each learned selection checked
        against the slots' dense captions (``phrase_ties.agreeing_slots``); a SEG whose
        selection was copied from a slot's caption keeps it.

        Args:
            markup: the decoded markup; selection: Float[S, n]; copied: Bool[S].
            class_names: of the contiguous class ids (``category_id``), or None.
        """
        captions = [info.get("caption", "") for info in slot_info]
        names = _slot_class_names(slot_info, class_names)
        slot_of_id = {int(info["id"]): k for k, info in enumerate(slot_info)}
        probs = selection.float().cpu()
        out = list(ties)
        for phrase in markup_to_grounded(markup)["phrases"]:
            s = phrase["seg_index"]
            if s is None or s >= len(ties) or bool(copied[s]):
                continue
            selected = [slot_of_id[i] for i, _ in ties[s]]
            slots = agreeing_slots(phrase["phrase"], captions, selected, probs[s].tolist(), names)
            out[s] = [(int(slot_info[k]["id"]), float(probs[s, k])) for k in slots]
        return out

    @staticmethod
    def _mention_ties(
        markup: str,
        ties: list[list[tuple[int, float]]],
        slot_info: list[dict],
        class_names: Optional[Sequence[str]] = None,
    ) -> tuple[str, list[list[tuple[int, float]]]]:
        """The markup with the unmarked mentions of kept segments marked up
        (``phrase_ties.ground_unmarked_mentions``) and the ties of its SEGs: the head's own,
        and for each added one its segments, each with the segment's score."""
        captions = [info.get("caption", "") for info in slot_info]
        markup, sources = ground_unmarked_mentions(
            markup, captions, _slot_class_names(slot_info, class_names)
        )
        own = iter(ties)
        out = []
        for slots in sources:
            if slots is None:
                out.append(next(own, []))
            else:
                out.append(
                    [(int(slot_info[k]["id"]), float(slot_info[k].get("score", 1.0))) for k in slots]
                )
        return markup, out

    def _tie_segments(
        self, selection: torch.Tensor, slot_info: list[dict], stuff: bool
    ) -> list[tuple[int, float]]:
        """The segments a SEG stands for, as ``(segment id, selection probability)``.

        Every slot of the SEG's kind (stuff for ``[SEG_STUFF]``, things for ``[SEG]``; any
        kind when the image has none of it) selected with at least ``grounded_tie_threshold``;
        when none is, the most selected slot of that kind.

        Args:
            selection: Float[n] the SEG's selection probability of each slot.
            slot_info: the slots' ``segments_info`` entries, in slot order.
            stuff: the SEG is a ``[SEG_STUFF]``.
        """
        kind = [k for k, info in enumerate(slot_info) if bool(info.get("isthing")) != stuff]
        candidates = kind or list(range(len(slot_info)))
        if not candidates:
            return []
        probs = selection.float().cpu().tolist()
        tied = [k for k in candidates if probs[k] >= self.grounded_tie_threshold]
        if not tied:
            tied = [max(candidates, key=lambda k: probs[k])]
        return [(int(slot_info[k]["id"]), probs[k]) for k in tied]
