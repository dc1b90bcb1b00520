"""Switch other libraries' deformable attention to msda.

* :mod:`msda.integrations.transformers`: ``enable()`` runs Hugging Face
  transformers' models (Deformable DETR, RT-DETR, Grounding DINO, Mask2Former,
  ...) on msda.
* :mod:`msda.integrations.mmcv`: mmcv's ``MultiScaleDeformableAttention``
  module and ``MultiScaleDeformableAttnFunction`` on msda, and ``patch()``
  that routes ``mmcv.ops`` (and so mmdet) to them.

Nothing here is imported by ``import msda``; each submodule imports its
library only when used.
"""
