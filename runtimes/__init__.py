"""Engine adapters, the runtime catalogue and accelerator detection."""
