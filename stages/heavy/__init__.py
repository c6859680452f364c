"""The heavyweight stage: a Triton model repository for the sequence model over a card's history.

Locally Triton runs from the binary in the ``nvidia-pytriton`` wheel with the Python-backend model
in ``triton_model/model.py`` (ONNX Runtime on CPU, the whole dynamic batch in one run), configured
by ``config.pbtxt.template`` (rendered by ``devstack.servers.triton``). In production
``deploy/triton/model_repository`` serves the same model name and tensor names from the official
Triton container with the onnxruntime backend on a GPU.

Tensor contract: input ``sequence`` float32 ``[N, 65, TOKEN_DIM]`` (the card's last 64
transactions plus the current one), output ``score`` float32 ``[N, 1]`` (fraud probability).
"""
