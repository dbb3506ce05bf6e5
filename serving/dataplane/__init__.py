"""The data plane: Ray Serve replicas that run the engines, and the payload codecs."""
