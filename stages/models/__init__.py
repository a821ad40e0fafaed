"""Models, built by name through ``stages.models.registry``.

Importing this package registers every model module's constructors.
"""

import stages.models.bn_nets  # noqa: F401  (registers bn_mnist_mlp, bn_inception_small)
import stages.models.mobilenetv1  # noqa: F401  (registers mobilenetv1*; it imports mobilenetv2_*)
import stages.models.small_nets  # noqa: F401  (registers small_inception*, small_alexnet, mlp_*)
import stages.models.ssl_nets  # noqa: F401  (registers wrn_28_2, wrn_10_1, ssl_convnet)
from stages.models import rcnn_backbones  # noqa: F401  (registers rcnn_* constructors)
from stages.models.registry import create, names, register

__all__ = ["create", "names", "register"]
