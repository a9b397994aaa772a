from utils.registry import Registry

MODELS = Registry("model")
