"""The edge of the data plane: the session core shared by every transport, and the public
gRPC `Converse` API (LiveKit and WebSocket transports come on top of the same core)."""
