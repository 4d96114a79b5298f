from pix2cap.utils.registry import Registry

DATASET_MAPPER_REGISTRY = Registry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = """
Registry for dataset mappers: callables turning one dataset dict (see
``pix2cap.data.datasets``) into the model's input dict, built as ``cls(cfg, is_train=...)``.
"""


def build_dataset_mapper(cfg, is_train: bool):
    name = cfg.INPUT.DATASET_MAPPER_NAME if is_train else cfg.INPUT.TEST_DATASET_MAPPER_NAME
    return DATASET_MAPPER_REGISTRY.get(name)(cfg, is_train=is_train)
