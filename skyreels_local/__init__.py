"""skyreels-local: self-hosted SkyReels V1 image-to-video with the WaveSpeed v3 HTTP contract."""

__version__ = "0.1.0"

MODEL_ID = "wavespeed-ai/SkyReels-V1"
