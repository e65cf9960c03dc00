"""Image classifiers as an ordered list of freezable units plus a head.

>>> from prefast.models import create_model
>>> model = create_model("densenet_bc", num_classes=10, in_channels=3, image_size=32,
...                      depth=16, growth=8)
>>> model.num_units, model.cut_points
(9, (1, 4, 7))
"""

from prefast.errors import ModelError
from prefast.models import densenet, resnet, vgg, wrn  # noqa: F401  (registers the factories)
from prefast.models.base import UnitModel
from prefast.models.custom import from_sequential
from prefast.models.registry import create_model, list_models, register_model, unregister_model

__all__ = [
    "ModelError",
    "UnitModel",
    "create_model",
    "from_sequential",
    "list_models",
    "register_model",
    "unregister_model",
]
