"""Model backends per stage: `local` (in-process torch) and `triton` (tritonclient gRPC)."""
