from utils.registry import Registry

ENCODINGS = Registry("encoding")
