"""SD3 model loading from local diffusers directories, and the tiny test model."""
