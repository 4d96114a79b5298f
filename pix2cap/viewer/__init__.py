"""Interactive HTML reports of pix2cap results: masks, dense, grounded and panoptic captions.

:class:`HtmlReport` writes a self-contained folder (index + one page per image) that opens
from ``file://``; :class:`ImageView` is one panel of an image page (a prediction or the
ground truth). ``tools/demo.py --html``, ``tools/visualize_data.py --html``,
``tools/pancap_infer.py --html`` and ``tools/train_net.py --eval-only TEST.HTML_REPORT True``
write them.
"""

from pix2cap.viewer.page import ImageView
from pix2cap.viewer.report import HtmlReport, page_key, page_keys

__all__ = ["HtmlReport", "ImageView", "page_key", "page_keys"]
