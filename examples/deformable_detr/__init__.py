"""A compact, complete Deformable DETR built on ``msda.MSDeformAttn``.

Files, one concern each: backbone.py, position_encoding.py, deformable_transformer.py,
deformable_detr.py (detector and heads), box_ops.py, postprocess.py, configs.py (variants),
checkpoint.py (original checkpoints), draw.py, api.py (programmatic inference),
predict.py (inference command). Training lives in matcher.py, losses.py, engine.py, train.py.
"""
