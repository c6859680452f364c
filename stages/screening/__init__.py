"""Stage 1: the screening worker, ONNX Runtime on CPU behind NATS request-reply."""
