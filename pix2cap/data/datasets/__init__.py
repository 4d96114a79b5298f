"""Dataset loaders. Each returns ``list[dict]``, one dict per image, in pix2cap's standard form.

Keys (absent keys mean the format has no such information):

``file_name``            absolute path of the RGB image
``image_id``             int or str, unique within the dataset
``height``, ``width``    image size in pixels, from the annotation file
``pan_seg_file_name``    absolute path of the panoptic PNG (segment id = R + 256 G + 256^2 B;
                         0 is VOID)
``segments_info``        list of dicts, one per segment of the PNG:
    ``id``               segment id in the PNG
    ``category_id``      contiguous class index in [0, num_classes)
    ``dataset_category_id``  the category id as written in the annotation file
    ``isthing``          bool
    ``iscrowd``          0 or 1
    ``area``             pixels
    ``bbox``             [x, y, w, h] in absolute pixels (COCO's XYWH)
    ``description``      the segment's caption (Pix2Cap-COCO and shapes), when present
    ``description_is_class_name``  True where an empty description was replaced by the class name
    (any other key of a segment in the file, e.g. the shapes generator's ``attributes`` and
    ``relation``, is copied through unchanged)
``grounded_caption``     COCONut-PanCap image caption, a dict:
    ``raw``              the caption as stored, tags included
    ``text``             the caption with the tags replaced by their phrases
    ``phrases``          list of ``{"phrase", "start", "end", "segment_ids", "tag_ids",
                         "convention"}``; ``text[start:end]`` is the phrase, ``segment_ids`` are
                         ids of the panoptic PNG (empty if the tag's ids did not resolve),
                         ``tag_ids`` the numbers as written in the tag
    ``convention``       which tag convention the parser applied (see
                         ``pix2cap.data.caption_formats``)
    ``mixed_id_conventions``  True when its colon tags were read under different conventions
    ``tag_stats``        tags counted per convention, plus unresolved tags / ids
``image_path``           SA-Pancap and shapes: the image's path relative to the data root, as the
                         data list and ground-truth caption files write it
``panoptic_caption``     SA-Pancap ground-truth caption (free text with ``[[x1, y1, x2, y2]]`` boxes;
                         invalid boxes removed, see ``pix2cap.data.datasets.sapancap``)
``panoptic_caption_boxes``  list of ``{"phrase", "box", "start", "end", "box_start", "box_end"}``
                         extracted from it: ``box`` four floats in [0, 1], ordered (as written),
                         ``phrase`` the text the box follows (``caption[start:end]``),
                         ``caption[box_start:box_end]`` the ``[[...]]`` literal
"""

from pix2cap.data.datasets.builtin import register_all_builtin  # noqa: E402

# Built-in names are registered on import, lazily: no file is touched until a dataset is loaded.
register_all_builtin()
