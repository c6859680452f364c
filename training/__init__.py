"""Offline side of the cascade: the transaction simulator, training and evaluation of both stages.

Needs the ``train`` extra (PyTorch, scikit-learn, skl2onnx) except :mod:`training.simulator` and
:mod:`training.datasets`, which need only numpy. Nothing here is imported by the serving path.
Entry point: ``python -m training --help``.
"""
