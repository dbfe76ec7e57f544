"""r1reward: train, evaluate and serve generative multimodal reward models (R1-Reward)."""
__version__ = "0.1.0"
