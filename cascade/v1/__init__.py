"""Generated protobuf and gRPC stubs for protos/cascade/v1 (do not edit; scripts/gen_protos.py)."""
