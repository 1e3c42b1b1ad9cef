"""Model parts: backbones, classification heads and training losses."""
