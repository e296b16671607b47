"""Generated protobuf and gRPC modules; never edit, run proto/generate.py."""
